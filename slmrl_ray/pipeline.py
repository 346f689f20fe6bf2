"""Run one configuration's stages in order, skipping those already done for this config.

`run_pipeline` is what `slmrl-ray run` calls and what a Tune trial will call: it walks
data -> sft -> reward -> ppo -> eval, runs each stage whose artifact folder is missing
or was produced by a different config (fingerprints, `slmrl_ray.artifacts`), and ends
with the study's results row for the configuration. Rerunning after a crash resumes at
the first unfinished stage; inside PPO, from the last checkpoint.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from slmrl_ray.artifacts import (
    STAGES,
    Reporter,
    RunPaths,
    is_stage_done,
    mark_stage_done,
    no_report,
    read_json,
)
from slmrl_ray.config import PipelineConfig


def stage_function(stage: str) -> Callable:
    """Stage modules import torch/transformers/trl, so they load only when a stage runs."""
    if stage == "data":
        from slmrl_ray.stages.prepare import run_data as run
    elif stage == "sft":
        from slmrl_ray.stages.sft import run_sft as run
    elif stage == "reward":
        from slmrl_ray.stages.reward import run_reward as run
    elif stage == "ppo":
        from slmrl_ray.stages.ppo import run_ppo as run
    elif stage == "eval":
        from slmrl_ray.stages.evaluate import run_eval as run
    else:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    return run


def run_pipeline(
    config: PipelineConfig,
    stages: Sequence[str] = STAGES,
    report: Reporter = no_report,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Run (or skip) each stage; returns every stage's metrics."""
    paths = RunPaths.for_config(config)
    results: dict[str, dict] = {}
    for stage in stages:
        if is_stage_done(paths, stage, config):
            log(f"[{stage}] done already ({paths.stage(stage)}), skipping")
            results[stage] = read_json(paths.stage(stage) / "metrics.json")
            continue
        log(f"[{stage}] running -> {paths.stage(stage)}")
        started = time.perf_counter()
        results[stage] = stage_function(stage)(config, paths, report)
        elapsed = time.perf_counter() - started
        mark_stage_done(paths, stage, config, results[stage], elapsed)
        log(f"[{stage}] finished in {elapsed:.1f} s")
    return results


def results_row(evaluation: dict) -> dict:
    """The study's results-table row for one configuration, from `evaluation_results.json`."""
    sft, ppo = evaluation["sft"], evaluation["ppo"]
    return {
        "model": evaluation["model"],
        "corpus": evaluation["corpus"],
        "sft_perplexity": sft["perplexity"],
        "ppo_perplexity": ppo["perplexity"],
        "sft_reward": sft["reward"]["mean"],
        "sft_reward_std": sft["reward"]["std"],
        "ppo_reward": ppo["reward"]["mean"],
        "ppo_reward_std": ppo["reward"]["std"],
        "delta_reward": evaluation["delta_reward"],
        "win_rate": evaluation["analytical_win_rate"],
        "paired_win_rate": evaluation["paired_win_rate"]["win_rate"],
        "paired_win_rate_ci": [
            evaluation["paired_win_rate"]["ci_low"],
            evaluation["paired_win_rate"]["ci_high"],
        ],
        "ppo_distinct_1": ppo["distinct_1"],
        "ppo_distinct_2": ppo["distinct_2"],
        "ppo_rougeL": ppo["rougeL"],
        "ppo_bleu": ppo["bleu"],
    }


def format_row(row: dict) -> str:
    """A markdown table with one row, in the study's column order."""
    header = ("model", "corpus", "SFT ppl", "PPO ppl", "SFT reward", "PPO reward", "delta",
              "win rate", "paired win (95% CI)", "distinct-1/2", "ROUGE-L", "BLEU")
    low, high = row["paired_win_rate_ci"]
    cells = (
        row["model"],
        row["corpus"],
        f"{row['sft_perplexity']:.2f}",
        f"{row['ppo_perplexity']:.2f}",
        f"{row['sft_reward']:.3f} ± {row['sft_reward_std']:.3f}",
        f"{row['ppo_reward']:.3f} ± {row['ppo_reward_std']:.3f}",
        f"{row['delta_reward']:+.3f}",
        f"{row['win_rate']:.1%}",
        f"{row['paired_win_rate']:.1%} ({low:.1%}-{high:.1%})",
        f"{row['ppo_distinct_1']:.3f}/{row['ppo_distinct_2']:.3f}",
        f"{row['ppo_rougeL']:.3f}",
        f"{row['ppo_bleu']:.2f}",
    )
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(cells) + " |"]
    )
