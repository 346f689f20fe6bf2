"""Per-cell settings chosen by a search, for a grid to read: `<search>/report/budgets.yaml`.

The path from a search to a grid (the writing side is `slmrl_ray.tuning.budgets_writer`):

    slmrl-ray search SEARCH_CONFIG     # its report step writes report/budgets.yaml
    # the grid's tune config: pipeline: {cell_overrides_from: <budgets.yaml, or the search's folder/URI>}
    slmrl-ray grid GRID_CONFIG

`write_budgets` (a search's report step) takes each cell's best trial by its `objective`,
the score on the validation share of the evaluation prompts (`search.validation_fraction`),
with the report's own ranking (`report.select_cells`); never by the reported (test) share.
A trial counts only if its evaluation has that validation share. Each cell's entry holds
the search config's own overrides for the cell (if any), the trial's sampled values as
`a.b.c=value` overrides and `eval.validation_fraction`, so the grid runs the cell as the
trial ran and reports only the prompts the search did not tune on, and its provenance: the search,
its storage, the trial, its objective, the validation fraction, the search seed, the
versions the trial ran with, its stage fingerprints and the settings that decide the
evaluation prompts and their split.

A tune config reads it with `pipeline.cell_overrides_from`: at load time its cells join
`pipeline.cell_overrides` (a cell in both is an error), provenance and all, and the key is
dropped, so the experiment's `experiment.json` holds the settings and `resume` reads no file.
A cell whose grid would draw other evaluation prompts, or split them otherwise, than its
search did is refused: its reported share could hold prompts the search tuned on.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from slmrl_ray.config import (
    ConfigError,
    PipelineConfig,
    _parse_yaml,
    build_dataclass,
    to_dict,
)

BUDGETS = "budgets.yaml"
VERSION = 1
LIBRARIES = ("slmrl-ray", "torch", "transformers", "trl", "peft", "ray", "optuna")
# The evaluation settings that, with the whole `data` section, decide which prompts a cell is
# evaluated on and which of them form the validation share.
PROMPT_KEYS = ("num_prompts", "prompt_chars", "prompt_format", "seed")

Scalar = bool | int | float | str


@dataclass(frozen=True)
class CellOverrides:
    """One cell's own settings (`pipeline.cell_overrides.<model/corpus>`) and where they came from.

    Written by hand, `{overrides: [...], search: <the search run that chose them>}`; read from
    a search's budgets file, every field. A bare list (no search named) is the older, hand-picked
    form: it still loads, but no shipped grid may keep one (tests/test_tune_config.py).
    """

    overrides: tuple[str, ...]
    search: str | None = None  # the search experiment's name (or its folder/URI, by hand)
    storage: str | None = None  # the search experiment's folder or URI
    trial_id: str | None = None
    objective: float | None = None  # the trial's objective on the validation share
    validation_fraction: float | None = None  # the search's validation share of the prompts
    seed: int | None = None  # the search's seed (a cell's sampler: seed + the cell's index)
    finished_at: str | None = None  # when the trial finished
    versions: dict[str, str] = field(default_factory=dict)  # package and key libraries of the trial
    fingerprints: dict[str, str] = field(default_factory=dict)  # the trial's stage fingerprints
    eval_prompts: dict[str, Scalar] = field(default_factory=dict)  # see PROMPT_KEYS
    budgets: str | None = None  # the budgets file it was read from (set when a tune config reads it)
    # The search config's own entry for this cell (say a reward-model budget), whose overrides
    # come first in `overrides`: what the chosen trial ran with, and where that came from.
    inherited: CellOverrides | None = None

    @property
    def hand_picked(self) -> bool:
        """Whether any of these settings names no search (here, or in the search's own entry)."""
        return self.search is None or (self.inherited is not None and self.inherited.hand_picked)


@dataclass(frozen=True)
class BudgetsFile:
    """`budgets.yaml`: a search's per-cell choice."""

    version: int
    search: str  # the search experiment's name
    storage: str  # its folder or URI
    validation_fraction: float
    seed: int
    objective: dict[str, Scalar]  # the search's objective settings (kind, score, kl_penalty)
    written_at: str
    written_with: dict[str, str]  # versions of the process that wrote the file
    cells: dict[str, CellOverrides] = field(default_factory=dict)
    without_budget: dict[str, str] = field(default_factory=dict)  # cell -> why it has no entry


def library_versions() -> dict[str, str]:
    """This package's and the key libraries' installed versions (no imports)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def eval_prompt_settings(config: PipelineConfig) -> dict[str, Scalar]:
    """The settings that decide a cell's evaluation prompts and their split, as dotted keys."""
    plain = to_dict(config)
    settings = {f"data.{key}": value for key, value in plain["data"].items()}
    settings.update({f"eval.{key}": plain["eval"][key] for key in PROMPT_KEYS})
    return {key: value for key, value in settings.items() if isinstance(value, (bool, int, float, str))}


# ---------------------------------------------------------------- reading (a tune config's load)


def _locate(location: str, relative_to: Path):
    """The budgets file at `location`: the file, or `budgets.yaml` or `report/budgets.yaml` under it."""
    # pyarrow: only when a tune config names a budgets file
    from slmrl_ray.storage import Storage

    scheme = urlsplit(location).scheme
    if not scheme or len(scheme) == 1:  # a local path, relative to the tune config
        path = Path(location).expanduser()
        location = str(path if path.is_absolute() else relative_to / path)
    try:
        place = Storage.from_uri(location)
        for candidate in (place, place.child(BUDGETS), place.child("report", BUDGETS)):
            if candidate.is_file():
                return candidate
    except (ValueError, OSError) as error:
        raise ConfigError(f"pipeline.cell_overrides_from: cannot read {location}: {error}") from None
    raise ConfigError(f"pipeline.cell_overrides_from: no {BUDGETS} at {place.uri} (nor under it, nor under its "
                      f"report/): run `slmrl-ray search` first, or `slmrl-ray report <the search>` to write it")


def read_budgets(location: str, relative_to: Path = Path(".")) -> tuple[str, BudgetsFile]:
    """Read and validate a budgets file strictly; returns its URI and contents."""
    place = _locate(location, relative_to)
    where = f"pipeline.cell_overrides_from: {place.uri}"
    try:
        data = _parse_yaml(place.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{where}: cannot read it: {error}") from None
    try:
        budgets = build_dataclass(BudgetsFile, data if data is not None else {})
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if budgets.version != VERSION:
        raise ConfigError(f"{where}: version {budgets.version} (this slmrl-ray reads version {VERSION})")
    return place.uri, budgets


def with_cell_budgets(data: dict, relative_to: Path = Path(".")) -> dict:
    """The tune config `data` with `pipeline.cell_overrides_from` read into `pipeline.cell_overrides`."""
    pipeline = data.get("pipeline") if isinstance(data, dict) else None
    if not isinstance(pipeline, dict) or pipeline.get("cell_overrides_from") is None:
        return data
    location = pipeline["cell_overrides_from"]
    if not isinstance(location, str):
        raise ConfigError(f"pipeline.cell_overrides_from: expected a path or URI, got {location!r}")
    uri, budgets = read_budgets(location, relative_to)
    written = pipeline.get("cell_overrides") or {}
    if not isinstance(written, dict):
        raise ConfigError(f"pipeline.cell_overrides: expected a mapping, got {type(written).__name__}")
    both = sorted(set(written) & set(budgets.cells))
    if both:
        raise ConfigError(f"pipeline.cell_overrides.{both[0]}: also in {uri}: a cell's own settings come from "
                          "one place")
    loaded = {cell: {**to_dict(entry), "budgets": uri} for cell, entry in budgets.cells.items()}
    rest = {key: value for key, value in pipeline.items() if key != "cell_overrides_from"}
    return {**data, "pipeline": {**rest, "cell_overrides": {**written, **loaded}}}


def cell_entries_as_mappings(data: dict) -> dict:
    """The tune config `data` with each bare-list `cell_overrides` entry as `{overrides: [...]}`.

    A mapping must name its search: that is what tells a search's choice from a hand pick.
    (`raw`, what experiment.json keeps, stays as written, so older experiments still resume.)
    """
    pipeline = data.get("pipeline") if isinstance(data, dict) else None
    entries = pipeline.get("cell_overrides") if isinstance(pipeline, dict) else None
    if not isinstance(entries, dict):
        return data
    cells = {}
    for cell, entry in entries.items():
        if isinstance(entry, dict) and entry.get("search") in (None, ""):
            raise ConfigError(f"pipeline.cell_overrides.{cell}.search: name the search run that chose these "
                              "settings (or read them with pipeline.cell_overrides_from)")
        cells[cell] = {"overrides": entry} if isinstance(entry, (list, tuple)) else entry
    return {**data, "pipeline": {**pipeline, "cell_overrides": cells}}


def check_eval_prompts(cell: str, entry: CellOverrides, config: PipelineConfig) -> None:
    """Refuse a cell whose evaluation prompts, or their split, differ from those its search tuned on."""
    grid = eval_prompt_settings(config)
    differ = [f"{key} {value!r} (here {grid[key]!r})" for key, value in sorted(entry.eval_prompts.items())
              if key in grid and grid[key] != value]
    if entry.validation_fraction is not None and config.eval.validation_fraction != entry.validation_fraction:
        differ.append(f"eval.validation_fraction {entry.validation_fraction!r} "
                      f"(here {config.eval.validation_fraction!r})")
    if differ:
        raise ConfigError(
            f"pipeline.cell_overrides.{cell}: the search {entry.search} tuned on other evaluation prompts or another "
            f"split ({'; '.join(differ)}): this grid's reported prompts could include ones it tuned on; search with "
            f"the grid's data and eval settings")
