"""`slmrl-ray bench <what>`: measured speed, printed as a markdown table and written as JSON.

    slmrl-ray bench stages  [--preset tiny] [--model ...] [--corpus ...] [a.b.c=value ...]
    slmrl-ray bench rollout [same options] [--repeats 5]
    slmrl-ray bench rl      [same options] [--repeats 3]
    slmrl-ray bench shapes  [--models a,b] [--peak-tflops X] [a.b.c=value ...]   (slmrl_ray.bench_shapes)
    slmrl-ray bench tune    <experiment folder or URI> [more experiments to compare]
    slmrl-ray bench serve   --registry <experiment or registry.json>   (slmrl_ray.serving.bench)

- `stages` runs one configuration from scratch in a scratch folder: SFT tokens/s and RM
  pairs/s (over the optimiser loop, `train_runtime`), the PPO step split into generation,
  scoring and update with rollout tokens/s (steps after the first), evaluation time, and
  peak memory. `shapes` runs it on the study models at full size and projects the paper grid.
- `rollout` compares one PPO rollout (sampling, reward scoring, policy/reference/value
  passes, GAE) with bare `generate` on the same model, prompts, batch and length.
- `rl` runs a few steps of our PPO and of TRL's GRPO and RLOO (`ppo.algorithm`) on the same
  configuration: the same rollout batch (responses per step), response length and optimiser
  updates per step (`stages.trl_rl` maps them), and the mean step time after a warm-up step,
  as a ratio to PPO. GRPO/RLOO sample `num_generations` responses per prompt, so a step holds
  fewer distinct prompts. The last step (it saves the final checkpoint) is not timed either.
- `tune` reads a finished grid or search: the span of its trials against the sum of
  trial times divided by the concurrency that ran (Tune's overhead). Given several (the
  same grid at `resources.gpu=1` and `=0.25`, say), it adds each one's speed-up over the first.
Every JSON records the machine (CPU or GPU name), library versions and the settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from slmrl_ray.artifacts import RunPaths, read_json
from slmrl_ray.config import PipelineConfig
from slmrl_ray.stages.ppo_state import initial_state, load_log, log_path


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
    return {"device": device, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, **{name: version(name) for name in ("transformers", "peft", "trl", "ray")}}


def peak_memory_mb() -> dict:
    import torch

    peak = {"process_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if torch.cuda.is_available():
        peak["cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def bench_stages(config: PipelineConfig) -> dict:
    """Run every stage once for `config` (from scratch) and measure each."""
    from slmrl_ray.pipeline import run_pipeline

    with tempfile.TemporaryDirectory(prefix="slmrl-bench-") as folder:
        config = dataclasses.replace(config, output_dir=folder)
        results = run_pipeline(config, log=lambda line: None)
        paths = RunPaths.for_config(config)
        wall = {stage: read_json(paths.stage(stage) / "stage.json")["wall_time_s"] for stage in results}
        log = load_log(log_path(paths.ppo))
        tokens_per_pair, prompt_tokens = _data_lengths(config, paths)
    sft, rm, ppo = config.sft, config.reward, config.ppo
    sft_tokens = results["sft"]["steps"] * sft.batch_size * sft.grad_accum * sft.max_length  # packed: full blocks
    rm_pairs = results["reward"]["steps"] * rm.batch_size * rm.grad_accum
    steps = [r for r in log if "reward_mean" in r]
    steps = steps[1:] or steps  # the first step pays for warm-up (allocations, kernel choice)
    generate_s = _mean(r["time_generate_s"] for r in steps)
    rows = [
        {"stage": "data", "wall_s": wall["data"]},
        {"stage": "sft", "wall_s": wall["sft"], "train_s": results["sft"]["train_runtime_s"],
         "throughput": sft_tokens / results["sft"]["train_runtime_s"], "unit": "tokens/s"},
        {"stage": "reward", "wall_s": wall["reward"], "train_s": results["reward"]["train_runtime_s"],
         "throughput": rm_pairs / results["reward"]["train_runtime_s"], "unit": "pairs/s",
         "tokens_per_pair": tokens_per_pair},
        {"stage": "ppo", "wall_s": wall["ppo"], "step_s": _mean(
            r["time_generate_s"] + r["time_score_s"] + r["time_update_s"] for r in steps),
         "generate_s": generate_s, "score_s": _mean(r["time_score_s"] for r in steps),
         "update_s": _mean(r["time_update_s"] for r in steps),
         "throughput": _mean(r["response_length"] for r in steps) * ppo.rollout_batch_size / generate_s,
         "unit": "rollout tokens/s", "prompt_tokens": prompt_tokens,
         "response_length": _mean(r["response_length"] for r in steps)},
        {"stage": "eval", "wall_s": wall["eval"], "throughput": 2 * results["eval"]["num_prompts"] / wall["eval"],
         "unit": "prompts/s (both policies)", "num_prompts": results["eval"]["num_prompts"]},
    ]
    return {"rows": rows, "peak_memory": peak_memory_mb()}


def _data_lengths(config: PipelineConfig, paths: RunPaths) -> tuple[float, float]:
    """Mean tokens of a training pair (chosen + rejected, as the RM sees them) and of a PPO prompt."""
    from slmrl_ray.data import PreferencePair, load_jsonl, ppo_prompts
    from slmrl_ray.models import load_tokenizer
    from slmrl_ray.scoring import encode_reward_text

    tokenizer = load_tokenizer(paths.sft / "model")
    pairs = load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair)
    length = config.reward.max_length
    pair_tokens = [len(encode_reward_text(tokenizer, p.prompt, p.chosen, length))
                   + len(encode_reward_text(tokenizer, p.prompt, p.rejected, length)) for p in pairs]
    prompt_tokens = [min(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), config.ppo.max_prompt_length)
                     for prompt in ppo_prompts(pairs)]
    return _mean(pair_tokens), _mean(prompt_tokens)


def bench_rollout(config: PipelineConfig, repeats: int = 5) -> dict:
    """One PPO rollout against bare `generate` (same model, prompts, batch, new tokens)."""
    import torch

    from slmrl_ray.generation import encode_prompts
    from slmrl_ray.pipeline import run_pipeline
    from slmrl_ray.stages.ppo import build_components, collect_rollout, step_seed

    cfg = config.ppo
    with tempfile.TemporaryDirectory(prefix="slmrl-bench-") as folder:
        config = dataclasses.replace(config, output_dir=folder)
        run_pipeline(config, stages=("data", "sft", "reward"), log=lambda line: None)
        parts = build_components(config, RunPaths.for_config(config))
    state = initial_state(cfg)
    prompts = parts.prompts[: cfg.rollout_batch_size]
    collect_rollout(parts, cfg, state, config.seed)  # warm-up
    rollout_s, generate_s = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        collect_rollout(parts, cfg, state, config.seed + repeat)
        rollout_s.append(time.perf_counter() - started)
        input_ids, attention_mask = encode_prompts(parts.tokenizer, prompts, cfg.max_prompt_length)
        torch.manual_seed(step_seed(config.seed, repeat))
        started = time.perf_counter()
        with torch.no_grad():
            parts.model.policy.generate(input_ids=input_ids.to(parts.device), attention_mask=attention_mask.to(parts.device),
                                        max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                        pad_token_id=parts.tokenizer.pad_token_id)
        generate_s.append(time.perf_counter() - started)
    rollout, bare = statistics.median(rollout_s), statistics.median(generate_s)
    return {"rows": [{"batch": cfg.rollout_batch_size, "new_tokens": cfg.max_new_tokens, "rollout_s": rollout,
                      "bare_generate_s": bare, "overhead_ratio": rollout / bare}],
            "peak_memory": peak_memory_mb()}


def bench_rl(config: PipelineConfig, repeats: int = 3) -> dict:
    """Our PPO against TRL's GRPO and RLOO: step time at equal batch, length and updates per step."""
    import shutil

    from slmrl_ray.pipeline import run_pipeline
    from slmrl_ray.stages.rl import run_rl

    steps = repeats + 2  # a warm-up step, `repeats` timed steps, and the final (checkpointing) step
    rows = []
    with tempfile.TemporaryDirectory(prefix="slmrl-bench-") as folder:
        config = dataclasses.replace(config, output_dir=folder)
        run_pipeline(config, stages=("data", "sft", "reward"), log=lambda line: None)
        paths = RunPaths.for_config(config)
        for algorithm in ("ppo", "grpo", "rloo"):
            ppo = dataclasses.replace(config.ppo, algorithm=algorithm, steps=steps, checkpoint_every=steps)
            reported: list[float] = []  # the clock at each step's report (once per step, in both trainers)

            def clock(metrics: dict, checkpoint=None) -> None:
                if "ppo/step" in metrics:
                    reported.append(time.perf_counter())

            metrics = run_rl(dataclasses.replace(config, ppo=ppo), paths, report=clock)
            log = load_log(log_path(paths.ppo))
            shutil.rmtree(paths.ppo)
            step_s = [b - a for a, b in zip(reported[: repeats], reported[1 : repeats + 1])]
            timed = log[1 : repeats + 1]
            rows.append({
                "algorithm": algorithm,
                "prompts": ppo.rollout_batch_size // (1 if algorithm == "ppo" else ppo.num_generations),
                "responses": ppo.rollout_batch_size,
                "max_new_tokens": ppo.max_new_tokens,
                "updates": _mean(r["updates"] for r in timed),
                "response_length": _mean(r["response_length"] for r in timed),
                "step_s": _mean(step_s),
                "step_s_min": min(step_s),
                "reward_first": metrics["reward_first"],
                "reward_last": metrics["reward_last"],
                "kl_last": metrics["kl_last"],
            })
    for row in rows:
        row["ratio_to_ppo"] = row["step_s"] / rows[0]["step_s"]
    return {"rows": rows, "peak_memory": peak_memory_mb()}


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
    from slmrl_ray.tuning.config import ExperimentError
    from slmrl_ray.tuning.experiment import load_records
    from slmrl_ray.storage import Storage

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


def format_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(target: str, result: dict, settings: dict, out: str | None) -> dict:
    payload = {"target": target, "machine": machine(), "settings": settings, **result}
    print(format_table(result["rows"]))
    if "peak_memory" in result:
        print(f"\npeak memory: {result['peak_memory']}")
    print(f"machine: {payload['machine']['device']}, torch {payload['machine']['torch']}")
    path = Path(out or f"bench_{target}.json")
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"written: {path}")
    return payload
