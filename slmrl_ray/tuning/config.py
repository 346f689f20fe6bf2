"""Tune configs (`tune_configs/*.yaml`): which cells to run, where, with what resources, and how to search.

A tune config names a pipeline config (a preset or a file, plus `a.b.c=value`
overrides), the cells to run (all 5 x 3 by default), the storage URI, per-trial
resources, retries, and for `slmrl-ray search` the Optuna search over the PPO KL
coefficient, learning rate and (optionally) steps. Loading is strict like the pipeline
config (same loader, same dotted-path errors), and every cell's pipeline config is built
once at load time, so a typo fails before Ray starts. A trial's sampled values reach the
pipeline config as overrides in one place, `cell_config`. A cell's own settings come from a
search's `budgets.yaml` (`pipeline.cell_overrides_from`, see `slmrl_ray.tuning.budgets`) or
name the search that chose them.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slmrl_ray.artifacts import STAGES
from slmrl_ray.config import (
    ConfigError,
    PipelineConfig,
    _read_yaml,
    apply_overrides,
    build_dataclass,
    config_from_dict,
    load_raw,
    preset_path,
    to_dict,
)
from slmrl_ray.tuning.budgets import (
    CellOverrides,
    cell_entries_as_mappings,
    check_eval_prompts,
    with_cell_budgets,
)


class ExperimentError(RuntimeError):
    """Trials failed for good (after their retries), or an experiment cannot start or resume."""


# The values a search samples, as pipeline config keys.
SEARCHED_KEYS = {"kl_coef": "ppo.init_kl_coef", "learning_rate": "ppo.learning_rate", "steps": "ppo.steps"}


@dataclass(frozen=True)
class PipelineSource:
    preset: str | None = "tiny"  # a shipped preset, or
    config: str | None = None  # a pipeline config file (relative to the tune config)
    overrides: tuple[str, ...] = ()  # `a.b.c=value`, applied to every cell
    # corpus key -> `a.b.c=value`s applied after `overrides` to that corpus's cells (budgets
    # that one corpus needs, e.g. a longer reward-model run for CNN/DailyMail's longer texts)
    corpus_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # model key -> `a.b.c=value`s applied after the corpus's to that model's cells (e.g. a
    # larger KL coefficient for a model that drifts further per step)
    model_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # "model/corpus" -> `{overrides: [a.b.c=value, ...], search: <the search run that chose them>}`,
    # applied last, to that one cell (a bare list, naming no search, is a hand pick: see `CellOverrides`)
    cell_overrides: dict[str, CellOverrides] = field(default_factory=dict)
    # A search's budgets.yaml, or the search experiment's folder or URI (a local path is relative to
    # the tune config): its cells join `cell_overrides` at load time, provenance and all, and this
    # key is dropped, so experiment.json holds the settings and `resume` reads no file.
    cell_overrides_from: str | None = None


@dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for. Fractional GPUs pack small-model trials onto one GPU."""

    cpu: float = 1.0
    gpu: float = 0.0
    # A trial given a GPU that torch cannot see fails (it would train on the CPU unnoticed).
    # True only for logical GPUs declared to Ray on purpose, e.g. to test scheduling.
    allow_logical_gpus: bool = False

    def __post_init__(self) -> None:
        if self.cpu <= 0 or self.gpu < 0:
            raise ConfigError("cpu must be positive and gpu non-negative")
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ConfigError("a trial asks for a fraction of one GPU or a whole number of GPUs")


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ConfigError("a range needs 0 < low < high")


@dataclass(frozen=True)
class Objective:
    """What a search maximises.

    `reward_gain`: held-out delta reward (PPO - SFT) minus `kl_penalty` x the PPO KL
    (per sequence, nats) at the end of training; during PPO, for pruning, the same gain
    measured on the training rollouts (the last `window` steps against the first).
    `pareto`: reward gain and KL as two objectives (maximise, minimise), no pruning.
    `score: judge` measures the final gain with the evaluation's judge (a reward model
    PPO never saw; the pipeline config needs `judge:`) instead of the training reward,
    so the search cannot pick the trial that fooled its own reward model best.
    """

    kind: Literal["reward_gain", "pareto"] = "reward_gain"
    score: Literal["reward", "judge"] = "reward"
    kl_penalty: float = 0.05
    window: int = 5
    diverged_score: float = -1000.0  # a diverged trial's score: always worse than any real one


@dataclass(frozen=True)
class Scheduler:
    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = 10  # PPO steps before a trial can be stopped
    reduction_factor: int = 2


@dataclass(frozen=True)
class Search:
    num_samples: int = 16  # trials per cell
    max_concurrent: int = 4  # trials per cell at once
    kl_coef: Range = Range(0.05, 0.2)  # the model card's range
    learning_rate: Range = Range(1e-6, 2e-5)
    objective: Objective = field(default_factory=Objective)
    scheduler: Scheduler = field(default_factory=Scheduler)
    # PPO steps as a categorical choice, e.g. [40, 60, 80]; empty: not searched (the pipeline
    # config's). ASHA's rungs then lie below the shortest choice (`asha_scheduler`).
    steps: tuple[int, ...] = ()
    seed: int = 0  # each cell's sampler gets seed + its index
    # The held-out prompts' share that the objective reads; the report shows the other share,
    # so a search is not graded on the prompts it was tuned on.
    validation_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise ConfigError("validation_fraction: must lie strictly between 0 and 1")
        if any(steps <= 0 for steps in self.steps) or len(set(self.steps)) != len(self.steps):
            raise ConfigError("steps: the PPO step counts to choose from must be distinct positive integers")


@dataclass(frozen=True)
class Faults:
    """Fault injection, to rehearse recovery before a long run: a trial's first attempt
    raises right after `crash_at_ppo_step` (resuming attempts do not); every attempt's PPO
    "diverges" at `diverge_at_ppo_step` (as a real divergence would, seed for seed)."""

    crash_at_ppo_step: int | None = None
    diverge_at_ppo_step: int | None = None
    cells: tuple[str, ...] = ()  # "model/corpus"; empty: every cell


@dataclass(frozen=True)
class RayInit:
    address: str | None = None  # None: $RAY_ADDRESS when set (ray job submit), else a local Ray
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only
    object_store_memory_mb: int | None = None


@dataclass(frozen=True)
class TuneFileConfig:
    name: str
    # A local path, an NFS path, s3:// or gs://. Unset: $SLMRL_RAY_STORAGE_PATH (cluster.yaml
    # sets it on every node), else ~/slmrl_ray_results.
    storage_path: str | None = None
    artifacts_path: str | None = None  # default <storage_path>/<name>/artifacts; share it to reuse stages
    pipeline: PipelineSource = field(default_factory=PipelineSource)
    models: tuple[str, ...] = ()  # empty: every model of the pipeline config
    corpora: tuple[str, ...] = ()  # empty: every corpus
    cells: tuple[str, ...] = ()  # explicit "model/corpus" list instead of models x corpora
    stages: tuple[str, ...] = STAGES
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2  # retries per trial, each resuming from its last checkpoint
    # grid: trials at once per Tuner, that is in the whole plain grid but per cell in a grid with
    # `grid:` axes (its cells' lanes run side by side); None: as many as resources allow
    max_concurrent_trials: int | None = None
    keep_checkpoints: int = 2
    search: Search | None = None
    # Extra grid axes crossed with the cells: pipeline config keys -> values, e.g.
    # {ppo.algorithm: [ppo, grpo, rloo]} runs the three per cell. Data, SFT and the reward
    # model run once per cell first (a `prepare` phase) and every variant reuses them.
    grid: dict[str, tuple[str | int | float | bool, ...]] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    ray: RayInit = field(default_factory=RayInit)

    @property
    def storage_uri(self) -> str:
        return self.storage_path or os.environ.get("SLMRL_RAY_STORAGE_PATH") or "~/slmrl_ray_results"

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"stages: {unknown[0]!r} is not one of {list(STAGES)}")
        if not self.name or "/" in self.name:
            raise ConfigError("name: must be non-empty and contain no '/'")
        if self.grid and self.search is not None:
            raise ConfigError("grid: extra grid axes are for `slmrl-ray grid`; a search samples instead")
        for key, values in self.grid.items():
            if not values:
                raise ConfigError(f"grid.{key}: needs at least one value")


@dataclass(frozen=True)
class TuneExperiment:
    """A loaded tune config with its resolved pipeline config (plain data) and cells."""

    config: TuneFileConfig
    raw: dict[str, Any]  # the tune config as plain data (what `experiment.json` keeps)
    base: dict[str, Any]  # the pipeline config as plain data, before cell overrides
    cells: tuple[str, ...]
    source: str  # where it was loaded from (for messages)

    def cell_config(self, cell: str, sampled: dict[str, Any] | None = None,
                    output_dir: str | None = None) -> PipelineConfig:
        """The one place where a cell and a trial's sampled (or grid) values become a pipeline config."""
        model, corpus = cell.split("/")
        source = self.config.pipeline
        own = source.cell_overrides[cell].overrides if cell in source.cell_overrides else ()
        overrides = [*source.overrides, *source.corpus_overrides.get(corpus, ()), *source.model_overrides.get(model, ()),
                     *own, f"model={model}", f"corpus={corpus}"]
        overrides += [f"{key}={json.dumps(value)}" for key, value in (sampled or {}).items()]
        if output_dir is not None:
            overrides.append(f"output_dir={output_dir}")
        return config_from_dict(apply_overrides(self.base, overrides))

    def cell_provenance(self, cell: str) -> dict | None:
        """The cell's `cell_overrides` entry as plain data (its settings and where they came from), or None."""
        entry = self.config.pipeline.cell_overrides.get(cell)
        return to_dict(entry) if entry is not None else None


def _pipeline_base(source: PipelineSource, relative_to: Path) -> dict:
    if (source.preset is None) == (source.config is None):
        raise ConfigError("pipeline: give exactly one of `preset` and `config`")
    if source.config is not None:
        path = Path(source.config)
        return load_raw(path if path.is_absolute() else relative_to / path)
    return load_raw(preset_path(source.preset))


def _cells(cfg: TuneFileConfig, base: PipelineConfig) -> tuple[str, ...]:
    if cfg.cells:
        if cfg.models or cfg.corpora:
            raise ConfigError("cells: give either `cells` or `models`/`corpora`, not both")
        return cfg.cells
    models = cfg.models or tuple(base.models)
    corpora = cfg.corpora or tuple(base.corpora)
    return tuple(f"{m}/{c}" for m, c in itertools.product(models, corpora))


def experiment_from_dict(data: dict, relative_to: Path = Path("."), source: str = "<dict>",
                         base: dict | None = None) -> TuneExperiment:
    """Validate a tune config; `base` (the resolved pipeline config) skips reading its source again.

    A budgets file named by `pipeline.cell_overrides_from` is read here, into the returned `raw`.
    """
    data = with_cell_budgets(data, relative_to)
    cfg = build_dataclass(TuneFileConfig, cell_entries_as_mappings(data))
    base = base if base is not None else _pipeline_base(cfg.pipeline, relative_to)
    try:
        default = config_from_dict(apply_overrides(base, list(cfg.pipeline.overrides)))
    except ConfigError as error:
        raise ConfigError(f"pipeline: {error}") from None
    if cfg.search is not None and cfg.search.objective.score == "judge" and default.judge.source == "none":
        raise ConfigError("search.objective.score: `judge` needs a judge in the pipeline config "
                          "(judge.source: split or external)")
    for corpus in cfg.pipeline.corpus_overrides:
        if corpus not in default.corpora:
            raise ConfigError(f"pipeline.corpus_overrides.{corpus}: unknown corpus (known: {', '.join(default.corpora)})")
    for model in cfg.pipeline.model_overrides:
        if model not in default.models:
            raise ConfigError(f"pipeline.model_overrides.{model}: unknown model (known: {', '.join(default.models)})")
    for cell, entry in cfg.pipeline.cell_overrides.items():
        model, _, corpus = cell.partition("/")
        if model not in default.models or corpus not in default.corpora:
            raise ConfigError(f"pipeline.cell_overrides.{cell}: not a model/corpus cell of the pipeline config "
                              f"(models: {', '.join(default.models)}; corpora: {', '.join(default.corpora)})"
                              + (f", read from {entry.budgets}" if entry.budgets else ""))
    experiment = TuneExperiment(cfg, data, base, _cells(cfg, default), source)
    for cell, entry in cfg.pipeline.cell_overrides.items():
        try:
            config = experiment.cell_config(cell)
        except ConfigError as error:
            raise ConfigError(f"pipeline.cell_overrides.{cell}: {error}"
                              + (f" (read from {entry.budgets})" if entry.budgets else "")) from None
        check_eval_prompts(cell, entry, config)
    for cell in experiment.cells:
        if cell.count("/") != 1:
            raise ConfigError(f"cells: {cell!r} is not of the form model/corpus")
        try:
            experiment.cell_config(cell)
        except ConfigError as error:
            raise ConfigError(f"cells: {cell}: {error}") from None
    for variant in grid_variants(cfg):
        try:
            experiment.cell_config(experiment.cells[0], variant)
        except ConfigError as error:
            raise ConfigError(f"grid: {variant}: {error}") from None
    return experiment


def grid_variants(cfg: TuneFileConfig) -> list[dict[str, Any]]:
    """Every combination of the extra grid axes (one empty variant without any)."""
    keys = list(cfg.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(cfg.grid[k] for k in keys))]


def load_tune_config(path: str | Path, overrides: list[str] = ()) -> TuneExperiment:
    """Load a tune config file strictly; `overrides` are `a.b.c=value` on the tune config itself."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path), list(overrides))
    return experiment_from_dict(data, path.parent, str(path))
