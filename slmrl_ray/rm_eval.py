"""Reward-model evaluation in the RewardBench style: pairwise accuracy per subset and per category.

    slmrl-ray rm-eval --reward-model SultanR/SmolTulu-1.7b-RM                   # RewardBench, `filtered` split
    slmrl-ray rm-eval --run runs/pythia-70m/tinystories                         # its RM (and judge), held-out pairs
    slmrl-ray rm-eval --dataset prefs.jsonl --run runs/a --reward-model org/rm --output rm_eval.json

A preference set has one row per comparison (prompt, chosen, rejected, subset); it comes
from the hub (`datasets.load_dataset(path, name, split=...)`) or a local .jsonl/.json/.parquet
file. A pair counts as correct when the chosen response scores strictly higher, exactly as
RewardBench's `rewardbench.py` counts it (`1 if chosen > rejected else 0`): a tie is wrong.

Subsets are aggregated into categories as RewardBench's `calculate_scores_per_section` does:
a weighted mean of the present subsets, weighted by RewardBench's fixed `EXAMPLE_COUNTS`
(`REWARDBENCH_WEIGHTS`; a subset RewardBench does not know weighs its own pair count).
Those counts upweight math-prm from its 447 pairs to 984, the six hep-* code subsets
together, so Reasoning = (math-prm + mean of the hep-* subsets) / 2 on the full set.
They also give xstest-should-refuse 250 and xstest-should-respond 154, which other
re-implementations say is the reverse of the two subsets' row counts (not checked here);
we keep RewardBench's numbers so that its published scores reproduce. Departures: a category with no subset present is left out (RewardBench
reports 0), and the average is the plain mean of the present categories. Which reward
models: external sequence classifiers (`rewards.external_scorer`, their own tokenizer and
chat template) and this pipeline's own (`rewards.pipeline_scorer`, the pipeline's format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import yaml

from slmrl_ray.config import ExternalRewardModel, config_from_dict

# rewardbench/constants.py (allenai/reward-bench): section -> subsets, and each subset's weight.
REWARDBENCH_CATEGORIES: Mapping[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
REWARDBENCH_WEIGHTS: Mapping[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 250,
    "xstest-should-respond": 154, "donotanswer": 136,
    "math-prm": 984,  # 447 pairs, upweighted to equal the six hep-* subsets together
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


class RMEvalError(ValueError):
    """A bad input to the evaluation (file, column, mapping, model); the CLI prints it on one line."""


@dataclass(frozen=True)
class PreferenceSet:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    subsets: list[str]


@dataclass(frozen=True)
class RewardModelEntry:
    """One row of the table: a name, where it comes from, and how to load its scorer."""

    name: str
    kind: str  # "external" | "pipeline"
    source: str
    revision: str | None
    load: Callable[[torch.device], object]  # -> a scoring.Scorer


# ----------------------------------------------------------------------------- data

def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        from datasets import load_dataset

        return list(load_dataset("parquet", data_files=str(path), split="train"))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise RMEvalError(f"{path}: expected a JSON list of records")
    return rows


def load_preferences(source: str, name: str | None = None, split: str = "filtered", subset_column: str = "subset",
                     max_per_subset: int | None = None, default_subset: str | None = None) -> PreferenceSet:
    """Rows with prompt, chosen, rejected and `subset_column` (or `default_subset` for every row).

    With `default_subset` (a pipeline run's own pairs) only the study's pairs count, as in the
    reward stage's `heldout_accuracy`: the degenerate ones (`kind` empty/fragment/padded) are
    easy and would flatter the figure.
    """
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise RMEvalError(f"{source}: no such file (local preference sets are {'/'.join(LOCAL_SUFFIXES)})")
        rows: Sequence[Mapping] = _read_rows(path)
    else:
        from datasets import load_dataset

        try:
            rows = load_dataset(source, name, split=split)
        except Exception as error:  # offline, unknown id, unknown split: all end the command
            raise RMEvalError(f"could not load dataset {source!r} (split {split!r}): {error}") from error
    if len(rows) == 0:
        raise RMEvalError(f"{source}: no rows")
    columns = ["prompt", "chosen", "rejected"] + ([] if default_subset else [subset_column])
    present = set(rows.column_names) if hasattr(rows, "column_names") else set(rows[0])
    for column in columns:
        if column not in present:
            raise RMEvalError(f"{source}: missing column {column!r} (columns: {', '.join(sorted(present))})")
    taken: dict[str, int] = {}
    prefs = PreferenceSet([], [], [], [])
    for index, row in enumerate(rows):
        if default_subset is not None and row.get("kind", "study") != "study":
            continue  # a run's empty/fragment/padded pairs: the reward stage reports them apart
        subset = default_subset or str(row.get(subset_column))
        if max_per_subset is not None and taken.get(subset, 0) >= max_per_subset:
            continue
        taken[subset] = taken.get(subset, 0) + 1
        for column, values in (("prompt", prefs.prompts), ("chosen", prefs.chosen), ("rejected", prefs.rejected)):
            value = row.get(column)
            if not isinstance(value, str):  # RewardBench's prompts are strings; message lists are not supported
                raise RMEvalError(f"{source}: row {index}: {column!r} must be a string, not {type(value).__name__}")
            values.append(value)
        prefs.subsets.append(subset)
    return prefs


def load_categories(path: str | Path) -> dict[str, list[str]]:
    """A YAML or JSON file mapping category -> list of subsets."""
    path = Path(path)
    if not path.is_file():
        raise RMEvalError(f"{path}: no such category file")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(
        isinstance(subsets, list) and all(isinstance(s, str) for s in subsets) for subsets in data.values()
    ):
        raise RMEvalError(f"{path}: expected a mapping of category -> list of subset names")
    return {str(category): list(subsets) for category, subsets in data.items()}


# ----------------------------------------------------------------------------- scoring and aggregation

def score_preferences(scorer, prefs: PreferenceSet) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] chosen and [N] rejected scores (all chosen in one call, then all rejected)."""
    return scorer.score(prefs.prompts, prefs.chosen), scorer.score(prefs.prompts, prefs.rejected)


def subset_results(chosen: torch.Tensor, rejected: torch.Tensor, subsets: Sequence[str]) -> dict[str, dict]:
    """Per subset (in first-seen order): accuracy (a tie counts as wrong), count, ties, mean margin."""
    margins = (chosen - rejected).tolist()
    results: dict[str, dict] = {}
    for subset in dict.fromkeys(subsets):
        mine = [m for m, s in zip(margins, subsets) if s == subset]
        results[subset] = {
            "accuracy": sum(m > 0 for m in mine) / len(mine),
            "count": len(mine),
            "ties": sum(m == 0 for m in mine),
            "mean_margin": sum(mine) / len(mine),
        }
    return results


def aggregate(
    accuracies: Mapping[str, float],
    counts: Mapping[str, int],
    categories: Mapping[str, Sequence[str]],
    weights: Mapping[str, float] = REWARDBENCH_WEIGHTS,
) -> tuple[dict[str, float], float | None]:
    """(category -> score, average): RewardBench's section scores from per-subset accuracies.

    A category's score is the mean of its present subsets' accuracies weighted by
    `weights[subset]`, or by `counts[subset]` for a subset not in `weights`. Categories with
    no subset present are left out; the average is the plain mean of the others (None if none).
    """
    scores: dict[str, float] = {}
    for category, subsets in categories.items():
        weighted = [(accuracies[s], weights[s] if s in weights else counts[s]) for s in subsets if s in accuracies]
        total = sum(weight for _, weight in weighted)
        if total > 0:
            scores[category] = sum(accuracy * weight for accuracy, weight in weighted) / total
    average = sum(scores.values()) / len(scores) if scores else None
    return scores, average


def evaluate(entry: RewardModelEntry, prefs: PreferenceSet, categories: Mapping[str, Sequence[str]],
             device: torch.device) -> dict:
    scorer = entry.load(device)
    chosen, rejected = score_preferences(scorer, prefs)
    subsets = subset_results(chosen, rejected, prefs.subsets)
    scores, average = aggregate({s: r["accuracy"] for s, r in subsets.items()},
                                {s: r["count"] for s, r in subsets.items()}, categories)
    return {"name": entry.name, "kind": entry.kind, "source": entry.source, "revision": entry.revision,
            # counted, not a float32 mean: a one-subset set's accuracy equals its subset's exactly
            "accuracy": int(((chosen - rejected) > 0).sum()) / len(chosen), "subsets": subsets,
            "categories": scores, "average": average}


# ----------------------------------------------------------------------------- reward models

def external_entry(name_or_path: str, revision: str | None, max_length: int, batch_size: int) -> RewardModelEntry:
    def load(device: torch.device):
        from slmrl_ray.rewards import external_scorer

        try:
            return external_scorer(ExternalRewardModel(name_or_path, revision, max_length, batch_size), device)
        except OSError as error:  # not a local folder and not reachable on the hub
            raise RMEvalError(f"could not load reward model {name_or_path!r}: {error}") from error

    name = name_or_path if revision is None else f"{name_or_path}@{revision}"
    return RewardModelEntry(name, "external", name_or_path, revision, load)


def run_entries(run_dir: str | Path):
    """(entries, config) for a pipeline run folder: its reward model, and its judge when trained."""
    reward_dir = Path(run_dir) / "reward"
    if not (reward_dir / "config.json").is_file() or not (reward_dir / "model").is_dir():
        raise RMEvalError(f"{run_dir}: no finished reward stage (expected reward/config.json and reward/model/)")
    config = config_from_dict(json.loads((reward_dir / "config.json").read_text()))
    entries = []
    for folder in ("model", "judge"):
        if (reward_dir / folder).is_dir():
            def load(device: torch.device, path: Path = reward_dir / folder):
                from slmrl_ray.rewards import pipeline_scorer

                return pipeline_scorer(path, config, device)

            name = f"{config.model}/{config.corpus} reward/{folder}"
            entries.append(RewardModelEntry(name, "pipeline", str(reward_dir / folder), None, load))
    return entries, config


# ----------------------------------------------------------------------------- tables

def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def category_table(results: Sequence[dict], categories: Mapping[str, Sequence[str]]) -> str:
    """Rows = reward models, columns = the categories any model has a score for, then Average."""
    shown = [c for c in categories if any(c in r["categories"] for r in results)]
    lines = ["| reward model | " + " | ".join([*shown, "Average"]) + " |",
             "|---|" + "---:|" * (len(shown) + 1)]
    for r in results:
        cells = [_percent(r["categories"].get(c)) for c in shown] + [_percent(r["average"])]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def subset_table(results: Sequence[dict], categories: Mapping[str, Sequence[str]]) -> str:
    """Rows = subsets (with their category and pair count), one column per reward model."""
    owner = {s: c for c, subsets in categories.items() for s in subsets}
    lines = ["| subset | category | pairs | " + " | ".join(r["name"] for r in results) + " |",
             "|---|---|---:|" + "---:|" * len(results)]
    for subset, first in results[0]["subsets"].items():
        cells = [_percent(r["subsets"][subset]["accuracy"]) for r in results]
        lines.append(f"| {subset} | {owner.get(subset, '-')} | {first['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

def run_rm_eval(reward_models: Sequence[tuple[str, str | None]] = (), runs: Sequence[str] = (),
                dataset: str | None = None, dataset_name: str | None = None, split: str = "filtered",
                subset_column: str = "subset", max_per_subset: int | None = None, categories_file: str | None = None,
                device: str = "auto", max_length: int = 512, batch_size: int = 16) -> dict:
    """Evaluate every reward model on one preference set; returns the report `--output` writes.

    Without `dataset`, the set is the first run's held-out pairs (one subset and one category,
    named after its corpus), or RewardBench when no run is given.
    """
    from slmrl_ray.device import resolve_device

    if not reward_models and not runs:
        raise RMEvalError("nothing to evaluate: give at least one --reward-model or --run")
    entries: list[RewardModelEntry] = []
    run_configs = []
    for run_dir in runs:
        found, config = run_entries(run_dir)
        entries.extend(found)
        run_configs.append((run_dir, config))
    entries.extend(external_entry(path, revision, max_length, batch_size) for path, revision in reward_models)

    categories: Mapping[str, Sequence[str]] = REWARDBENCH_CATEGORIES
    default_subset = None
    if dataset is None and run_configs:
        run_dir, config = run_configs[0]
        dataset, default_subset = str(Path(run_dir) / "data" / "pairs_heldout.jsonl"), config.corpus
        categories = {config.corpus: [config.corpus]}
    elif dataset is None:
        dataset = "allenai/reward-bench"
    if categories_file is not None:
        categories = load_categories(categories_file)
    prefs = load_preferences(dataset, dataset_name, split, subset_column, max_per_subset, default_subset)
    resolved = resolve_device(device)
    results = [evaluate(entry, prefs, categories, resolved) for entry in entries]
    present = dict.fromkeys(prefs.subsets)
    return {
        "dataset": {"source": dataset, "name": dataset_name, "split": split,
                    "subset_column": subset_column if default_subset is None else None,
                    "max_per_subset": max_per_subset, "pairs": len(prefs.prompts)},
        "categories": {c: list(s) for c, s in categories.items()},
        "weights": {s: REWARDBENCH_WEIGHTS.get(s, results[0]["subsets"][s]["count"]) for s in present},
        "uncategorized": [s for s in present if not any(s in subsets for subsets in categories.values())],
        "tie_rule": "a pair is correct when chosen scores strictly higher; a tie counts as wrong (RewardBench)",
        "device": str(resolved),
        "settings": {"max_length": max_length, "batch_size": batch_size},
        "models": results,
    }


def format_report(report: dict) -> str:
    """The category table, then the per-subset table (percentages)."""
    dataset = report["dataset"]
    return "\n".join([
        f"Pairwise accuracy (%) on {dataset['source']} ({dataset['pairs']} pairs); ties count as wrong.",
        "", category_table(report["models"], report["categories"]),
        "", subset_table(report["models"], report["categories"]),
    ])
