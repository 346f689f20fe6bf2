"""`slmrl-ray bench stages | rollout | rl`: one configuration's stages, one PPO rollout, PPO
against GRPO/RLOO (what each measures: the `slmrl_ray.bench` docstring)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time

from slmrl_ray.artifacts import RunPaths, read_json
from slmrl_ray.bench.common import mean, peak_memory_mb
from slmrl_ray.config import ConfigError, PipelineConfig
from slmrl_ray.stages.ppo_state import initial_state, load_log, log_path


def bench_stages(config: PipelineConfig, keep: bool = False) -> dict:
    """Run every stage once for `config` (from scratch) and measure each: in a temporary folder,
    or with `keep` in the config's `output_dir`, which must not hold this cell's run yet (a
    finished stage there would be skipped, not measured)."""
    from slmrl_ray.pipeline import run_pipeline

    with contextlib.ExitStack() as cleanup:
        if keep:
            root = RunPaths.for_config(config).root
            if root.exists() and any(root.iterdir()):
                raise ConfigError(f"{root} is not empty: bench stages measures every stage from scratch")
        else:
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="slmrl-bench-"))
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
    generate_s = mean(r["time_generate_s"] for r in steps)
    rows = [
        {"stage": "data", "wall_s": wall["data"]},
        {"stage": "sft", "wall_s": wall["sft"], "train_s": results["sft"]["train_runtime_s"],
         "throughput": sft_tokens / results["sft"]["train_runtime_s"], "unit": "tokens/s"},
        {"stage": "reward", "wall_s": wall["reward"], "train_s": results["reward"]["train_runtime_s"],
         "throughput": rm_pairs / results["reward"]["train_runtime_s"], "unit": "pairs/s",
         "tokens_per_pair": tokens_per_pair},
        {"stage": "ppo", "wall_s": wall["ppo"], "step_s": mean(
            r["time_generate_s"] + r["time_score_s"] + r["time_update_s"] for r in steps),
         "generate_s": generate_s, "score_s": mean(r["time_score_s"] for r in steps),
         "update_s": mean(r["time_update_s"] for r in steps),
         "throughput": mean(r["response_length"] for r in steps) * ppo.rollout_batch_size / generate_s,
         "unit": "rollout tokens/s", "prompt_tokens": prompt_tokens,
         "response_length": mean(r["response_length"] for r in steps)},
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
    return mean(pair_tokens), mean(prompt_tokens)


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
                "updates": mean(r["updates"] for r in timed),
                "response_length": mean(r["response_length"] for r in timed),
                "step_s": mean(step_s),
                "step_s_min": min(step_s),
                "reward_first": metrics["reward_first"],
                "reward_last": metrics["reward_last"],
                "kl_last": metrics["kl_last"],
            })
    for row in rows:
        row["ratio_to_ppo"] = row["step_s"] / rows[0]["step_s"]
    return {"rows": rows, "peak_memory": peak_memory_mb()}
