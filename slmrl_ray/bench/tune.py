"""`slmrl-ray bench tune`: Tune's overhead for finished experiments, from their cell records
(what it measures: the `slmrl_ray.bench` docstring). Reads storage only: no Ray."""

from __future__ import annotations

from slmrl_ray.storage import Storage
from slmrl_ray.tuning.config import ExperimentError
from slmrl_ray.tuning.experiment import load_records


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


def bench_tune(uris: list[str]) -> dict:
    """Tune's overhead for finished experiments, from their cell records; with several, each
    one's speed-up over the first (the same grid at other resources: packing fractional GPUs)."""
    rows = []
    for uri in uris:
        records = [r for r in load_records(Storage.from_uri(uri)) if "started_at" in r]
        if not records:
            raise ExperimentError(f"no finished trials with timings under {uri}")
        intervals = [(r["started_at"], r["ended_at"]) for r in records]
        span = max(end for _, end in intervals) - min(start for start, _ in intervals)
        busy = sum(r["trial_wall_time_s"] for r in records)
        concurrency = _max_overlap(intervals)
        rows.append({"experiment": uri, "trials": len(records), "concurrency": concurrency, "span_s": span,
                     "trial_sum_s": busy, "ideal_s": busy / concurrency, "overhead_ratio": span / (busy / concurrency),
                     "speedup_vs_first": rows[0]["span_s"] / span if rows else 1.0})
    return {"rows": rows}
