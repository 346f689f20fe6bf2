"""What every benchmark shares: the machine it ran on, peak memory, the markdown table and the JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
from pathlib import Path


def machine() -> dict:
    """The device and library versions (read from package metadata: the stage benchmarks need no Ray)."""
    from importlib import metadata

    import torch

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"device": device, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            **{name: version(name) for name in ("transformers", "peft", "trl", "ray")}}


def peak_memory_mb() -> dict:
    import torch

    peak = {"process_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available():
        peak["cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def format_table(rows: list[dict]) -> str:
    """A markdown table, one column per key (in first-seen order); floats to 3 significant digits,
    anything else as `str` (so a caller can format its own cells)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(target: str, result: dict, settings: dict, out: str | None) -> dict:
    """Print `result["rows"]` as a table and write the result with the machine and settings as JSON."""
    payload = {"target": target, "machine": machine(), "settings": settings, **result}
    print(format_table(result["rows"]))
    if "peak_memory" in result:
        print(f"\npeak memory: {result['peak_memory']}")
    print(f"machine: {payload['machine']['device']}, torch {payload['machine']['torch']}")
    path = Path(out or f"bench_{target}.json")
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"written: {path}")
    return payload
