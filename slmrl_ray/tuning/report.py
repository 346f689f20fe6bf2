"""The study's results table, plots and serving registry from a tuning experiment's records.

Every Tune trial ends by writing one JSON cell record (`<experiment root>/results/<trial_id>.json`)
with its evaluation, stage metrics and fingerprints; the driver adds a placeholder record (a
`state` and a `reason`) for every expected cell or variant without one: failed, skipped, not run. `write_report` picks one
record per (model, corpus) cell -- the newest for a grid, the best non-diverged by objective
for a search -- and writes into a local folder:

- `results.md`, `results.csv`, `results.json`: the study's table; `results.md` counts the
  confirmed gains and states the rule (`CONFIRM_RULE`, `pipeline.confirmed_gain`); cells that
  diverged or never finished are listed with the reason under "Cells without results", never as numbers;
- `rewards.png`, `win_rates.png` and, for a search, `search_landscape.png`;
- `registry.json`: per cell, the SFT, reward and PPO stages' fingerprints with their metrics, for
  serving, which finds the committed artifacts under the experiment's root where it is now, and
  the cell's own settings with their provenance (`cell_overrides`).
(A search's `budgets.yaml`, its per-cell choice for a grid, is written by `slmrl_ray.tuning.budgets_writer`.)

No Ray here, and no storage access: the caller gathers the records and uploads the folder, so
the report can be rebuilt from any process, and tested, without a cluster.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from slmrl_ray.pipeline import (
    CONFIRMED_MAX_KL,
    CONFIRMED_MIN_ACCURACY,
    CONFIRMED_MIN_WIN_RATE,
    format_interval,
    format_judge,
    format_optional,
    results_row,
)

MODEL_ORDER = ("pythia-70m", "pythia-160m", "pythia-410m", "smollm2-135m", "smollm2-360m")
CORPUS_ORDER = ("tinystories", "cnn_dailymail", "wikitext")
# The search landscape's axes: the two PPO settings the study's searches tune.
KL_PARAM, LR_PARAM = "ppo.init_kl_coef", "ppo.learning_rate"
REGISTRY_VERSION = 2  # 2: fingerprints resolved against the experiment's root, no URIs
_OLDEST = datetime.min.replace(tzinfo=timezone.utc)


# -- choosing one record per cell ------------------------------------------------------------


def _finished_at(record: dict) -> datetime:
    """When the trial finished; a record without a time sorts as the oldest."""
    stamp = record.get("finished_at")
    if not stamp:
        return _OLDEST
    try:  # trials write `+0000` offsets, which `fromisoformat` reads only from Python 3.11
        parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        parsed = datetime.fromisoformat(stamp)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _objective(record: dict) -> float | None:
    value = record.get("objective")
    return None if value is None or math.isnan(value) else float(value)


def _search_rank(record: dict) -> tuple:
    """Higher is better: not diverged, then any objective over none, the higher one, the newer."""
    objective = _objective(record)
    has_objective = objective is not None
    return (not record.get("diverged", False), has_objective, objective if has_objective else 0.0,
            _finished_at(record))


def _study_position(key: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(key), "") if key in order else (len(order), key)


def _cell_order(model: str, corpus: str) -> tuple:
    return (*_study_position(model, MODEL_ORDER), *_study_position(corpus, CORPUS_ORDER))


def _group_by_cell(records: Iterable[dict]) -> list[tuple[tuple[str, str], list[dict]]]:
    """Records grouped by (model, corpus), in the study's cell order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["model"], record["corpus"]), []).append(record)
    return sorted(groups.items(), key=lambda item: _cell_order(*item[0]))


def _variant(record: dict) -> tuple:
    """A grid record's variant (its extra grid axes, e.g. the algorithm); () for a search's."""
    return tuple(sorted((record.get("params") or {}).items())) if record.get("kind") != "search" else ()


def select_cells(records: Iterable[dict]) -> list[dict]:
    """One record per (model, corpus) and grid variant, in study order: a grid's newest, a search's best.

    A search cell whose trials all diverged keeps its newest diverged record, so the cell
    is still reported (as one without results).
    """
    cells = []
    for _, group in _group_by_cell(records):
        variants: dict[tuple, list[dict]] = {}
        for record in group:
            variants.setdefault(_variant(record), []).append(record)
        for variant in sorted(variants, key=str):
            members = [r for r in variants[variant] if "state" not in r] or variants[variant]  # real ones first
            is_search = any(record.get("kind") == "search" for record in members)
            cells.append(max(members, key=_search_rank if is_search else _finished_at))
    return cells


# -- the results table -----------------------------------------------------------------------


def _missing_reason(record: dict) -> str | None:
    """Why a chosen record has no numbers to show, or None when it has."""
    if "state" in record:  # a placeholder: failed, skipped or not run
        return record["reason"]
    if record.get("diverged"):
        what = "every search trial diverged" if record.get("kind") == "search" else "PPO diverged"
        error = record.get("error") or ""
        if error.startswith("TrainingCheckError"):
            what = "every search trial failed a training check" if record.get("kind") == "search" else \
                "a training check failed"
        return f"{what}: {error.split(': ', 1)[-1]}" if error else what
    if not record.get("evaluation"):
        return "no evaluation (the trial did not finish)"
    return None


def _state(record: dict, reason: str | None) -> str:
    if "state" in record:
        return record["state"]
    if record.get("diverged"):
        return "diverged"
    return "done" if reason is None else "unfinished"


def has_results(row: dict) -> bool:
    return row.get("reason") is None


def results_table(cells: Iterable[dict]) -> list[dict]:
    """One row per cell: `results_row`'s numbers, or only the cell and its `reason`.

    Every row also carries `trial_id`, `params`, `objective` and `reason` (None with results).
    """
    rows = []
    for record in cells:
        reason = _missing_reason(record)
        row = ({"model": record["model"], "corpus": record["corpus"]} if reason
               else results_row(record["evaluation"], record.get("metrics")))
        row.update(trial_id=record["trial_id"], params=record.get("params") or {},
                   objective=_objective(record), reason=reason, state=_state(record, reason))
        rows.append(row)
    return rows


def _param_keys(rows: list[dict]) -> list[str]:
    return sorted({key for row in rows for key in row.get("params", {})})


def _table_line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _format_number(value: float | str | None) -> str:
    """A number to 3 significant digits; a grid variant's text value (e.g. `grpo`) as it is."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3g}"


def _markdown_cells(row: dict, param_keys: list[str], with_objective: bool) -> list[str]:
    cells = [
        row["model"], row["corpus"],
        f"{row['sft_perplexity']:.2f}", f"{row['ppo_perplexity']:.2f}",
        f"{row['sft_reward']:.3f} ± {row['sft_reward_std']:.3f}",
        f"{row['ppo_reward']:.3f} ± {row['ppo_reward_std']:.3f}",
        f"{row['delta_reward']:+.3f}", f"{row['win_rate']:.1%}",
        f"{row['paired_win_rate']:.1%} ({format_interval(row['paired_win_rate_ci'])})",
        f"{row['sft_distinct_1']:.3f}/{row['sft_distinct_2']:.3f}",
        f"{row['ppo_distinct_1']:.3f}/{row['ppo_distinct_2']:.3f}",
        f"{row['ppo_rouge1']:.3f}/{row['ppo_rouge2']:.3f}/{row['ppo_rougeL']:.3f}",
        f"{row['ppo_bleu']:.2f}",
        format_optional(row.get("gold_delta"), "+.3f"),
        format_judge(row),
        _format_number(row.get("judge_accuracy")),
        _format_number(row.get("rm_accuracy")),
        _format_number(row.get("kl")),
        ", ".join(row.get("hacking_flags") or []) or "none",
        "yes" if row.get("confirmed") else "no",
    ]
    if with_objective:
        cells.append(_format_number(row["objective"]))
    return cells + [_format_number(row["params"].get(key)) for key in param_keys]


def _markdown_table(rows: list[dict]) -> str:
    param_keys = _param_keys(rows)
    # Objective and parameter columns only mean something for a search.
    with_objective = any(row.get("objective") is not None for row in rows)
    header = ["model", "corpus", "SFT ppl", "PPO ppl", "SFT reward", "PPO reward", "delta",
              "win rate", "paired win (95% CI)", "distinct-1/2 SFT", "distinct-1/2 PPO",
              "ROUGE-1/2/L PPO", "BLEU PPO", "gold delta", "judge delta (95% CI)", "judge acc", "RM acc",
              "KL", "flags", "confirmed",
              *(["objective"] if with_objective else []), *param_keys]
    lines = [_table_line(header), "|" + "---|" * len(header)]
    lines += [_table_line(_markdown_cells(row, param_keys, with_objective)) for row in rows]
    return "\n".join(lines)


# `pipeline.confirmed_gain` in words, its thresholds read from the constants it applies.
CONFIRM_RULE = (
    f"a held-out reward gain (delta > 0) whose paired win rate's 95% CI lies above {CONFIRMED_MIN_WIN_RATE * 100:g}%; "
    f"judge delta > 0 with the judge's paired 95% CI above {CONFIRMED_MIN_WIN_RATE * 100:g}%; "
    f"judge held-out accuracy >= {CONFIRMED_MIN_ACCURACY:g} and, where the reward has a trained reward model, "
    f"its held-out accuracy >= {CONFIRMED_MIN_ACCURACY:g}; no hacking flag; a finite KL <= {CONFIRMED_MAX_KL:g} "
    "nats. The gold delta (ROUGE-L F1 against the real continuation) is reported, not required"
)


def confirmed_count(rows: list[dict]) -> str:
    """"Confirmed gains: N of M cells (...)": the cells whose gain `pipeline.confirmed_gain` believes."""
    confirmed = sum(bool(row.get("confirmed")) for row in rows if has_results(row))
    return f"Confirmed gains: {confirmed} of {len(rows)} cells ({CONFIRM_RULE})."


def format_summary(rows: list[dict]) -> str:
    """The markdown results table, the confirmed-gain count, then a "Cells without results" section if any."""
    with_results = [row for row in rows if has_results(row)]
    missing = [row for row in rows if not has_results(row)]
    parts = [_markdown_table(with_results) if with_results else "No cell has results yet."]
    if with_results:
        parts.append(confirmed_count(rows))
    if missing:
        parts.append("## Cells without results\n\n" + "\n".join(
            f"- {row['model']} / {row['corpus']}{_variant_text(row)}: {row['reason']} (trial {row['trial_id'] or '-'})"
            for row in missing
        ))
    return "\n\n".join(parts)


def _variant_text(row: dict) -> str:
    params = row.get("params") or {}
    return f" [{', '.join(f'{k}={v}' for k, v in sorted(params.items()))}]" if params else ""


def _csv_record(row: dict, param_keys: list[str]) -> dict:
    """The row with flat columns: each CI as `_low`/`_high` in its place, params as `params.<key>`."""
    flat = {}
    for key, value in row.items():
        if key.endswith("_ci"):
            flat[f"{key}_low"], flat[f"{key}_high"] = value if value is not None else (None, None)
        elif key == "hacking_flags":
            flat[key] = ";".join(value)
        elif key not in ("params", "reason"):
            flat[key] = value
    return flat | {f"params.{key}": row["params"].get(key) for key in param_keys}


def write_results(rows: list[dict], out_dir: Path) -> list[Path]:
    """`results.md`, `results.csv` (cells with results only) and `results.json` (every row)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, table, rows_json = out_dir / "results.md", out_dir / "results.csv", out_dir / "results.json"
    markdown.write_text("# Results\n\n" + format_summary(rows) + "\n")
    with_results = [row for row in rows if has_results(row)]
    flat = [_csv_record(row, _param_keys(with_results)) for row in with_results]
    # Columns follow `results_row`'s keys, so a metric added there reaches the CSV by itself.
    columns = list(dict.fromkeys(key for record in flat for key in record)) or ["model", "corpus"]
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    rows_json.write_text(json.dumps(rows, indent=2) + "\n")
    return [markdown, table, rows_json]


# -- plots -----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A Figure on an Agg canvas: no pyplot, so no global backend switch or figure registry.

    matplotlib loads here rather than at import so printing the table never pays for it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _bar_label(row: dict) -> str:
    """model, corpus and, for a grid variant, its values (a search's sampled floats would crowd it)."""
    variant = [str(v) for v in (row.get("params") or {}).values() if not isinstance(v, float)]
    return "\n".join([row["model"], row["corpus"], *variant])


def _paired_bars(rows: list[dict], bars: dict[str, tuple[list[float], object]], title: str, ylabel: str):
    """A figure with two bars per cell, `bars` = {label: (heights, yerr)}; returns (figure, axes)."""
    figure = _figure(max(6.0, 1.2 * len(rows) + 2), 4.5)
    axes = figure.add_subplot(title=title, ylabel=ylabel)
    width = 0.38
    for offset, (label, (heights, errors)) in zip((-width / 2, width / 2), bars.items()):
        axes.bar([x + offset for x in range(len(rows))], heights, width, yerr=errors, capsize=3, label=label)
    axes.set_xticks(range(len(rows)), [_bar_label(row) for row in rows], fontsize=8)
    return figure, axes


def plot_rewards(rows: list[dict], path: Path) -> Path:
    """Grouped bars of SFT vs PPO mean reward per cell, with one-std error bars."""
    rows = [row for row in rows if has_results(row)]
    bars = {policy.upper(): ([row[f"{policy}_reward"] for row in rows], [row[f"{policy}_reward_std"] for row in rows])
            for policy in ("sft", "ppo")}
    figure, axes = _paired_bars(rows, bars, "Reward-model score of the SFT and PPO policies", "mean reward (± std)")
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.legend()
    return _save(figure, path)


def plot_win_rates(rows: list[dict], path: Path) -> Path:
    """Analytical and paired win rate of PPO over SFT per cell (paired with its 95% CI)."""
    from matplotlib.ticker import PercentFormatter

    rows = [row for row in rows if has_results(row)]
    paired = [row["paired_win_rate"] for row in rows]
    below = [max(0.0, rate - row["paired_win_rate_ci"][0]) for rate, row in zip(paired, rows)]
    above = [max(0.0, row["paired_win_rate_ci"][1] - rate) for rate, row in zip(paired, rows)]
    bars = {"analytical": ([row["win_rate"] for row in rows], None), "paired (95% CI)": (paired, [below, above])}
    figure, axes = _paired_bars(rows, bars, "Win rate of PPO over SFT", "PPO win rate over SFT")
    axes.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="50%")
    axes.set_ylim(0, 1)
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.legend()
    return _save(figure, path)


def _draw_landscape(figure, axes, trials: list[dict]) -> None:
    placed = [t for t in trials if KL_PARAM in t.get("params", {}) and LR_PARAM in t["params"]]
    diverged = [t for t in placed if t.get("diverged")]
    scored = [t for t in placed if not t.get("diverged") and _objective(t) is not None]

    def coords(group: list[dict]) -> tuple[list[float], list[float]]:
        return [t["params"][KL_PARAM] for t in group], [t["params"][LR_PARAM] for t in group]

    if scored:
        points = axes.scatter(*coords(scored), c=[_objective(t) for t in scored], cmap="viridis",
                              edgecolors="black", linewidths=0.4)
        figure.colorbar(points, ax=axes, label="objective")
    if diverged:
        axes.scatter(*coords(diverged), marker="x", color="red", label="diverged")
        axes.legend(fontsize=7)
    axes.set(xscale="log", yscale="log", xlabel="init KL coef", ylabel="learning rate")


def plot_search_landscape(records: Iterable[dict], path: Path) -> Path | None:
    """Per cell, every search trial at (init KL coef, learning rate), coloured by objective.

    Diverged trials are red crosses. Returns None, writing nothing, without search records.
    """
    cells = _group_by_cell(record for record in records if record.get("kind") == "search")
    if not cells:
        return None
    columns = min(3, len(cells))
    rows = math.ceil(len(cells) / columns)
    figure = _figure(4.4 * columns, 3.6 * rows)
    for index, ((model, corpus), trials) in enumerate(cells):
        axes = figure.add_subplot(rows, columns, index + 1)
        _draw_landscape(figure, axes, trials)
        axes.set_title(f"{model} / {corpus}", fontsize=9)
    figure.suptitle("Search trials by PPO init KL coef and learning rate")
    return _save(figure, path)


# -- the serving registry and the whole report ------------------------------------------------


def _registry_cell(record: dict) -> dict:
    fingerprints, metrics, evaluation = record["fingerprints"], record.get("metrics") or {}, record["evaluation"]
    return {
        "model": record["model"],
        "corpus": record["corpus"],
        "sft": {"fingerprint": fingerprints["sft"], "metrics": metrics.get("sft", {})},
        "ppo": {
            "fingerprint": fingerprints["ppo"],
            "trial_id": record["trial_id"],
            "params": record.get("params") or {},
            "objective": _objective(record),
            "metrics": {**metrics.get("ppo", {}), "delta_reward": evaluation["delta_reward"],
                        "win_rate": evaluation["analytical_win_rate"]},
        },
        "reward": {"fingerprint": fingerprints["reward"], "metrics": metrics.get("reward", {})},
        "fingerprints": fingerprints,
        # The cell's own settings and where they came from (a search's budgets entry), or None.
        "cell_overrides": record.get("cell_overrides"),
    }


def registry(cells: Iterable[dict]) -> dict:
    """What serving loads: per `<model>/<corpus>` with results, its model URIs and metrics.

    A grid with variants (say PPO, GRPO and RLOO per cell) registers each cell's variant
    with the highest held-out delta reward; its `params` say which it is.
    """
    cells = list(cells)
    first = cells[0] if cells else {}
    chosen: dict[str, dict] = {}
    for record in cells:
        if _missing_reason(record) is not None:
            continue
        key = f"{record['model']}/{record['corpus']}"
        if key not in chosen or record["evaluation"]["delta_reward"] > chosen[key]["evaluation"]["delta_reward"]:
            chosen[key] = record
    return {
        "version": REGISTRY_VERSION,
        "experiment": first.get("experiment"),
        "kind": first.get("kind"),
        "cells": {key: _registry_cell(record) for key, record in chosen.items()},
    }


def write_report(records: Iterable[dict], out_dir: Path) -> dict:
    """Table, plots and registry for `records` into `out_dir`; returns what was written.

    Summary keys: `written` (paths), `cells_with_results` (a count) and
    `cells_without_results` (model, corpus, trial_id and reason of each).
    """
    out_dir = Path(out_dir)
    records = list(records)
    cells = select_cells(records)
    rows = results_table(cells)
    written = write_results(rows, out_dir)
    if any(has_results(row) for row in rows):
        written += [plot_rewards(rows, out_dir / "rewards.png"), plot_win_rates(rows, out_dir / "win_rates.png")]
    landscape = plot_search_landscape(records, out_dir / "search_landscape.png")
    if landscape is not None:
        written.append(landscape)
    registry_path = out_dir / "registry.json"
    registry_path.write_text(json.dumps(registry(cells), indent=2) + "\n")
    written.append(registry_path)
    missing = [{key: row[key] for key in ("model", "corpus", "trial_id", "reason")}
               for row in rows if not has_results(row)]
    return {"written": written, "rows": rows, "cells_with_results": len(rows) - len(missing),
            "cells_without_results": missing}
