"""A search's per-cell choice, written for a grid to read: `<search>/report/budgets.yaml`.

The writing side of `slmrl_ray.tuning.budgets` (which reads the file when a tune config names it):
each cell's best trial by its objective on the validation share of the evaluation prompts, never
by the reported share, with its settings as overrides and its provenance. Apart from the reading
side so that `tuning.config` (which reads budgets) and this module (which needs the config's
searched keys and the report's ranking) do not import each other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import yaml

from slmrl_ray.config import PipelineConfig, to_dict
from slmrl_ray.tuning.budgets import BUDGETS, VERSION, CellOverrides, eval_prompt_settings, library_versions
from slmrl_ray.tuning.config import SEARCHED_KEYS, experiment_from_dict
from slmrl_ray.tuning.report import select_cells


def _validation_scored(record: dict) -> bool:
    """A finished, not diverged search trial whose objective was measured on a validation share."""
    objective = record.get("objective")
    evaluation = record.get("evaluation") or {}
    return (record.get("kind") == "search" and "state" not in record and not record.get("diverged")
            and isinstance(objective, (int, float)) and math.isfinite(objective) and "validation" in evaluation)


def budget_entry(record: dict, search, name: str, storage: str, config: PipelineConfig,
                 own: CellOverrides | None) -> dict:
    """One cell's entry in budgets.yaml: its chosen trial's record, the search (`Search`), the cell's
    config and the search config's own entry for the cell (`own`)."""
    params = record.get("params") or {}
    sampled = [f"{key}={json.dumps(params[key])}" for key in SEARCHED_KEYS.values() if key in params]
    replaced = (*SEARCHED_KEYS.values(), "eval.validation_fraction")  # set again below
    inherited = [o for o in (own.overrides if own else ()) if o.partition("=")[0] not in replaced]
    return {
        "overrides": [*inherited, *sampled, f"eval.validation_fraction={search.validation_fraction}"],
        "search": name, "storage": storage, "trial_id": record["trial_id"],
        "objective": float(record["objective"]), "validation_fraction": search.validation_fraction,
        "seed": search.seed, "finished_at": record.get("finished_at"),
        "versions": record.get("versions") or {}, "fingerprints": record.get("fingerprints") or {},
        "eval_prompts": eval_prompt_settings(config),
        **({"inherited": to_dict(own)} if own else {}),
    }


def budgets_from_records(records: list[dict], saved: dict, storage: str) -> dict | None:
    """budgets.yaml's contents for a search's records (None for a grid): each cell's best by validation."""
    if saved["kind"] != "search":
        return None
    experiment = experiment_from_dict(saved["tune_config"], source=saved["source"], base=saved["pipeline"])
    search = experiment.config.search
    best = {f"{r['model']}/{r['corpus']}": r for r in select_cells([r for r in records if _validation_scored(r)])}
    cells, without = {}, {}
    for cell in experiment.cells:
        if cell in best:
            cells[cell] = budget_entry(best[cell], search, saved["name"], storage, experiment.cell_config(cell),
                                       experiment.config.pipeline.cell_overrides.get(cell))
        else:
            without[cell] = "no finished trial with an objective on the validation share (diverged, failed or not run)"
    objective = dataclasses.asdict(search.objective)
    return {
        "version": VERSION, "search": saved["name"], "storage": storage,
        "validation_fraction": search.validation_fraction, "seed": search.seed,
        "objective": {key: objective[key] for key in ("kind", "score", "kl_penalty")},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "written_with": library_versions(),
        "cells": cells, "without_budget": without,
    }


HEADER = """\
# Each cell's settings chosen by the search `{search}`: its best trial by the objective on the
# validation share of the evaluation prompts (never the reported share). Written by its report step.
# A grid reads it with `pipeline: {{cell_overrides_from: <this file, or the search's folder/URI>}}`;
# `eval.validation_fraction` keeps the prompts the search tuned on out of the grid's reported numbers.
"""


def write_budgets(saved: dict, storage: str, records: list[dict], out_dir: Path) -> Path | None:
    """`out_dir/budgets.yaml` for a search (`saved`: its experiment.json); None, writing nothing, for a grid."""
    budgets = budgets_from_records(records, saved, storage)
    if budgets is None:
        return None
    path = Path(out_dir) / BUDGETS
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(budgets, sort_keys=False, default_flow_style=None, width=120)
    path.write_text(HEADER.format(search=budgets["search"]) + body)
    return path
