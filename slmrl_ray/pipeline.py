"""Run one configuration's stages in order, skipping those already done for this config.

`run_pipeline` is what `slmrl-ray run` calls and what a Tune trial will call: it walks
data -> sft -> reward -> ppo -> eval, runs each stage whose artifact folder is missing
or was produced by a different config (fingerprints, `slmrl_ray.artifacts`), and ends
with the study's results row for the configuration. Rerunning after a crash resumes at
the first unfinished stage; inside PPO, from the last checkpoint.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Protocol, Sequence

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
        from slmrl_ray.stages.rl import run_rl as run
    elif stage == "eval":
        from slmrl_ray.stages.evaluate import run_eval as run
    else:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    return run


class StageStore(Protocol):
    """Where finished stages live beyond this machine (a Tune experiment's storage).

    `fetch` copies a finished stage with this config's fingerprint into `paths` (False
    when there is none), `started` records that this process is about to run a stage,
    and `publish` uploads and commits a finished stage folder (False when another
    writer committed the same fingerprint first: its stage is the one to continue from).
    """

    def fetch(self, paths: RunPaths, stage: str, config: PipelineConfig) -> bool: ...

    def started(self, stage: str, config: PipelineConfig) -> None: ...

    def publish(self, paths: RunPaths, stage: str, config: PipelineConfig) -> bool: ...


def run_pipeline(
    config: PipelineConfig,
    stages: Sequence[str] = STAGES,
    report: Reporter = no_report,
    log: Callable[[str], None] = print,
    store: StageStore | None = None,
) -> dict[str, dict]:
    """Run (or skip, or fetch from `store`) each stage; returns every stage's metrics.

    After each stage, `report` gets `{"stage_done": stage, "stage_executed": bool, ...}`.
    """
    paths = RunPaths.for_config(config)
    results: dict[str, dict] = {}
    for stage in stages:
        executed, elapsed = False, 0.0
        if is_stage_done(paths, stage, config):
            log(f"[{stage}] done already ({paths.stage(stage)}), skipping")
        elif store is not None and store.fetch(paths, stage, config):
            log(f"[{stage}] fetched from storage")
        else:
            log(f"[{stage}] running -> {paths.stage(stage)}")
            if store is not None:
                store.started(stage, config)
            started = time.perf_counter()
            metrics = stage_function(stage)(config, paths, report)
            elapsed = time.perf_counter() - started
            mark_stage_done(paths, stage, config, metrics, elapsed)
            executed = True
            log(f"[{stage}] finished in {elapsed:.1f} s")
            if store is not None and not store.publish(paths, stage, config):
                store.fetch(paths, stage, config)  # what every other trial sees
                log(f"[{stage}] another trial published it first; continuing from theirs")
        results[stage] = read_json(paths.stage(stage) / "metrics.json")
        report({"stage_done": stage, "stage_executed": executed, f"{stage}/wall_time_s": elapsed})
    return results


# Text metrics copied into the results row for both policies, as `sft_<name>` / `ppo_<name>`.
ROW_TEXT_METRICS = ("distinct_1", "distinct_2", "rouge1", "rouge2", "rougeL", "bleu", "precision_4gram")


# The confirm rule's thresholds (`confirmed_gain`); the report's legend is written from these.
# A paired win rate's 95 % interval must lie above this (a coin flip between SFT and PPO).
CONFIRMED_MIN_WIN_RATE = 0.5
# A model that misorders more than about 1 held-out pair in 7 ranks two policies' answers too
# noisily to certify a gain: the reward model behind the gain, and the judge that confirms it.
CONFIRMED_MIN_ACCURACY = 0.85
# A PPO policy this far from its reference (nats per response) has left the region where its
# reward model's scores mean anything; the adaptive controller aims at 6 (the study's target).
CONFIRMED_MAX_KL = 20.0


def _interval(paired: dict | None) -> list[float] | None:
    """A paired win rate's 95 % interval as [low, high], None without one."""
    return None if paired is None else [paired["ci_low"], paired["ci_high"]]


def results_row(evaluation: dict, stage_metrics: dict | None = None) -> dict:
    """The study's results-table row for one configuration, from `evaluation_results.json`.

    With the stages' metrics it also carries the reward model's held-out accuracy and the
    PPO policy's final KL; `confirmed` says whether the gain is one to believe (`confirmed_gain`).
    The judge's fields are None without a judge; `judge_accuracy` and the gold fields are None
    for an evaluation that predates them.
    """
    sft, ppo = evaluation["sft"], evaluation["ppo"]
    text_metrics = {
        f"{name}_{metric}": policy[metric]
        for name, policy in (("sft", sft), ("ppo", ppo))
        for metric in ROW_TEXT_METRICS
    }
    judge, gold = evaluation.get("judge") or {}, evaluation.get("gold") or {}
    judge_paired, gold_paired = judge.get("paired_win_rate"), gold.get("paired_win_rate")
    stage_metrics = stage_metrics or {}
    row = {
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
        "paired_win_rate_ci": _interval(evaluation["paired_win_rate"]),
        **text_metrics,
        "gold_delta": gold.get("delta"),
        "gold_paired_win_rate": gold_paired["win_rate"] if gold_paired else None,
        "gold_paired_win_rate_ci": _interval(gold_paired),
        "judge_delta": judge.get("delta"),
        "judge_paired_win_rate": judge_paired["win_rate"] if judge_paired else None,
        "judge_paired_win_rate_ci": _interval(judge_paired),
        "judge_accuracy": judge.get("heldout_accuracy"),
        "hacking_flags": [flag.split(":")[0] for flag in evaluation.get("hacking_flags", [])],
        "rm_accuracy": stage_metrics.get("reward", {}).get("heldout_accuracy"),
        "kl": stage_metrics.get("ppo", {}).get("kl_last"),
    }
    row["confirmed"] = confirmed_gain(row)
    return row


def confirmed_gain(row: dict) -> bool:
    """A held-out reward gain to believe. Every one of:

    - the training reward rose (`delta_reward` > 0) and its paired win rate's 95 % interval lies
      above CONFIRMED_MIN_WIN_RATE;
    - a judge (a reward model PPO never saw) agrees: judge delta > 0 and its own paired
      interval above CONFIRMED_MIN_WIN_RATE;
    - the judge's held-out accuracy is at least CONFIRMED_MIN_ACCURACY (no accuracy: not
      confirmed), and so is the reward model's when there is one (rules or an external
      reward have no `rm_accuracy`, and no floor);
    - no hacking flag, and a finite final KL of at most CONFIRMED_MAX_KL.

    The gold check (ROUGE-L against the real continuation) is reported only: it is not part
    of the rule, since a continuation is one good answer among many.
    """
    kl, rm_accuracy, judge_accuracy = row.get("kl"), row.get("rm_accuracy"), row.get("judge_accuracy")
    judge_interval = row.get("judge_paired_win_rate_ci")
    return (
        row["delta_reward"] > 0
        and row["paired_win_rate_ci"][0] > CONFIRMED_MIN_WIN_RATE
        and row.get("judge_delta") is not None and row["judge_delta"] > 0
        and judge_interval is not None and judge_interval[0] > CONFIRMED_MIN_WIN_RATE
        and judge_accuracy is not None and judge_accuracy >= CONFIRMED_MIN_ACCURACY
        and (rm_accuracy is None or rm_accuracy >= CONFIRMED_MIN_ACCURACY)
        and not row.get("hacking_flags")
        and kl is not None and math.isfinite(kl) and kl <= CONFIRMED_MAX_KL
    )


def format_interval(interval: list[float] | None) -> str:
    """A paired win rate's 95 % interval as `52.1%-69.0%`, `-` without one."""
    return "-" if interval is None else f"{interval[0]:.1%}-{interval[1]:.1%}"


def format_judge(row: dict) -> str:
    """The judge's delta with its paired interval, `+0.300 (55.0%-70.0%)`; `-` without a judge."""
    if row.get("judge_delta") is None:
        return "-"
    return f"{row['judge_delta']:+.3f} ({format_interval(row.get('judge_paired_win_rate_ci'))})"


def format_optional(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, `-` for None (a field the run has no number for)."""
    return "-" if value is None else format(value, spec)


def format_row(row: dict) -> str:
    """A markdown table with one row, in the study's column order, then the gold check, the
    judge, the reward model's accuracy, the KL, the flags and whether the gain is confirmed."""
    header = ("model", "corpus", "SFT ppl", "PPO ppl", "SFT reward", "PPO reward", "delta",
              "win rate", "paired win (95% CI)", "distinct-1/2", "ROUGE-L", "BLEU", "gold delta",
              "judge delta (95% CI)", "judge acc", "RM acc", "KL", "flags", "confirmed")
    cells = (
        row["model"],
        row["corpus"],
        f"{row['sft_perplexity']:.2f}",
        f"{row['ppo_perplexity']:.2f}",
        f"{row['sft_reward']:.3f} ± {row['sft_reward_std']:.3f}",
        f"{row['ppo_reward']:.3f} ± {row['ppo_reward_std']:.3f}",
        f"{row['delta_reward']:+.3f}",
        f"{row['win_rate']:.1%}",
        f"{row['paired_win_rate']:.1%} ({format_interval(row['paired_win_rate_ci'])})",
        f"{row['ppo_distinct_1']:.3f}/{row['ppo_distinct_2']:.3f}",
        f"{row['ppo_rougeL']:.3f}",
        f"{row['ppo_bleu']:.2f}",
        format_optional(row.get("gold_delta"), "+.3f"),
        format_judge(row),
        format_optional(row.get("judge_accuracy"), ".3f"),  # 3 places: 0.846 must not read as the 0.85 floor
        format_optional(row.get("rm_accuracy"), ".3f"),
        format_optional(row.get("kl"), ".1f"),
        ", ".join(row.get("hacking_flags") or []) or "none",
        "yes" if row.get("confirmed") else "no",
    )
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(cells) + " |"]
    )
