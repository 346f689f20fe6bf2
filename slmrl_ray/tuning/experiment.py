"""The Ray Tune driver: a grid over cells, an Optuna search per cell, resume, and the report.

Storage layout, under `<storage_path>/<name>/` (any URI `slmrl_ray.storage` takes):

    experiment.json            what was asked (kind + the tune config): `resume` needs only this
    artifacts/                 finished stage folders by fingerprint (unless `artifacts_path`)
    grid/                      the grid's Tune experiment (trial checkpoints, results, TensorBoard)
    prepare/                   a search's first phase: data, SFT and RM once per cell
    search-<model>-<corpus>/   a search's Optuna study for one cell (one Tuner per cell, since
                               OptunaSearch rejects grid_search and ASHA must compare like with like)
    results/<trial_id>.json    one record per finished cell trial
    report/                    results.{md,csv,json}, PNG plots, registry.json

Each phase is a `Tuner`; `resume` walks the phases again, restoring each one whose Tune
state exists (`Tuner.restore`, errored trials resumed) and starting the others, so a
driver killed at any point continues where the storage says it was.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slmrl_ray.config import ConfigError
from slmrl_ray.storage import ArtifactStore, Storage, artifacts_storage, parent_uri
from slmrl_ray.tuning.config import SEARCHED_KEYS, ExperimentError, TuneExperiment, experiment_from_dict

MANIFEST = "experiment.json"
UPSTREAM = ("data", "sft", "reward")


@dataclass(frozen=True)
class Phase:
    name: str  # the Tune experiment's folder under the experiment root
    kind: str  # "grid", "prepare" or "search"
    cells: tuple[str, ...]
    stages: tuple[str, ...]


def experiment_root(experiment: TuneExperiment) -> Storage:
    return Storage.from_uri(experiment.config.storage_uri).child(experiment.config.name)


def phases(experiment: TuneExperiment, kind: str) -> list[Phase]:
    stages = experiment.config.stages
    upstream = tuple(s for s in stages if s in UPSTREAM)
    if kind == "grid":
        grid = [Phase("grid", "grid", experiment.cells, stages)]
        # Variants of a cell share its data, SFT and RM: build those once, before they race.
        return [Phase("prepare", "prepare", experiment.cells, upstream), *grid] if experiment.config.grid else grid
    searched = [Phase(f"search-{cell.replace('/', '-')}", "search", (cell,), stages) for cell in experiment.cells]
    return [Phase("prepare", "prepare", experiment.cells, upstream), *searched]


# ---------------------------------------------------------------- Ray and Tune objects


def init_ray(experiment: TuneExperiment) -> None:
    """Connect to Ray once: `ray.address`, else $RAY_ADDRESS (set by `ray job submit`), else local."""
    import ray

    if ray.is_initialized():
        return
    settings = experiment.config.ray
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    store_mb = settings.object_store_memory_mb
    ray.init(
        num_cpus=settings.num_cpus,
        num_gpus=settings.num_gpus,
        object_store_memory=store_mb * 1024 * 1024 if store_mb else None,
        dashboard_host="127.0.0.1",
    )


def _trainable(experiment: TuneExperiment, phase: Phase, root: Storage, artifacts: Storage):
    from ray import tune

    from slmrl_ray.tuning.trial import cell_trial

    resources = experiment.config.resources
    trainable = tune.with_parameters(
        cell_trial,
        experiment=experiment,
        kind=phase.kind,
        stages=phase.stages,
        storage_uri=root.uri,
        artifacts_uri=artifacts.uri,
    )
    return tune.with_resources(trainable, {"cpu": resources.cpu, "gpu": resources.gpu})


def _run_config(experiment: TuneExperiment, phase: Phase, root: Storage):
    from ray import tune

    cfg = experiment.config
    return tune.RunConfig(
        name=phase.name,
        storage_path=root.path,
        storage_filesystem=root.filesystem,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        verbose=1,
    )


def _search_tune_config(experiment: TuneExperiment, phase: Phase, index: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    search = experiment.config.search
    cell_config = experiment.cell_config(phase.cells[0])
    if search.objective.kind == "pareto":
        metric, mode = ["reward_gain", "kl"], ["max", "min"]
        searcher = OptunaSearch(metric=metric, mode=mode, seed=search.seed + index)
        return tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent),
            scheduler=FIFOScheduler(), num_samples=search.num_samples, reuse_actors=True,
        )
    if search.scheduler.kind == "asha":
        scheduler = ASHAScheduler(
            time_attr="ppo_step",
            max_t=cell_config.ppo.steps,
            grace_period=min(search.scheduler.grace_period, cell_config.ppo.steps),
            reduction_factor=search.scheduler.reduction_factor,
            stop_last_trials=False,  # a trial reaching the last PPO step still runs its evaluation
        )
    else:
        scheduler = FIFOScheduler()
    searcher = OptunaSearch(seed=search.seed + index)
    return tune.TuneConfig(
        metric="objective", mode="max",
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent),
        scheduler=scheduler, num_samples=search.num_samples, reuse_actors=True,
    )


def _param_space(experiment: TuneExperiment, phase: Phase) -> dict:
    from ray import tune

    if phase.kind == "grid" and experiment.config.grid:
        axes = {key: tune.grid_search(list(values)) for key, values in experiment.config.grid.items()}
        return {"cell": tune.grid_search(list(phase.cells)), "grid": axes}
    if phase.kind != "search":
        return {"cell": tune.grid_search(list(phase.cells))}
    search = experiment.config.search
    ranges = {"kl_coef": search.kl_coef, "learning_rate": search.learning_rate}
    space = {
        SEARCHED_KEYS[name]: (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
        for name, r in ranges.items()
    }
    return {"cell": phase.cells[0], "search": space}


def _tuner(experiment: TuneExperiment, phase: Phase, index: int, root: Storage, artifacts: Storage):
    from ray import tune

    trainable = _trainable(experiment, phase, root, artifacts)
    phase_path = root.child(phase.name)
    if tune.Tuner.can_restore(phase_path.path, storage_filesystem=root.filesystem):
        return tune.Tuner.restore(phase_path.path, trainable, resume_errored=True,
                                  storage_filesystem=root.filesystem), True
    if phase.kind == "search":
        tune_config = _search_tune_config(experiment, phase, index)
    else:
        tune_config = tune.TuneConfig(
            reuse_actors=True, max_concurrent_trials=experiment.config.max_concurrent_trials
        )
    return tune.Tuner(
        trainable,
        param_space=_param_space(experiment, phase),
        tune_config=tune_config,
        run_config=_run_config(experiment, phase, root),
    ), False


# ---------------------------------------------------------------- the commands


def write_manifest(experiment: TuneExperiment, kind: str, root: Storage) -> None:
    """Record what was asked, self-contained (the resolved pipeline config included)."""
    manifest = root.child(MANIFEST)
    raw = experiment.raw
    payload = {"version": 1, "kind": kind, "name": experiment.config.name, "tune_config": raw,
               "pipeline": experiment.base, "source": experiment.source,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if manifest.is_file():
        existing = manifest.read_json()
        if (existing["kind"], existing["tune_config"]) != (kind, raw):
            raise ExperimentError(
                f"{root.uri} already holds a different experiment ({existing['kind']} from "
                f"{existing['source']}); continue it with `slmrl-ray resume {root.uri}` or pick another name"
            )
        return
    manifest.write_json(payload)


def run_experiment(experiment: TuneExperiment, kind: str, log: Callable[[str], None] = print) -> dict:
    """Run (or continue) a grid or a search; returns the report summary."""
    if kind == "search" and experiment.config.search is None:
        raise ConfigError("search: a `search` section is required for `slmrl-ray search`")
    root = experiment_root(experiment)
    write_manifest(experiment, kind, root)
    artifacts = artifacts_storage(root, experiment.config.artifacts_path)
    init_ray(experiment)
    errors: list[str] = []
    for index, phase in enumerate(phases(experiment, kind)):
        started = time.perf_counter()
        tuner, restored = _tuner(experiment, phase, index, root, artifacts)
        log(f"[{phase.name}] {'restored' if restored else 'starting'}: {len(phase.cells)} cell(s), "
            f"stages {', '.join(phase.stages)}")
        results = tuner.fit()
        log(f"[{phase.name}] finished in {time.perf_counter() - started:.1f} s, {results.num_errors} error(s)")
        errors += [f"{phase.name}: {error}" for error in results.errors]
    summary = write_report(root, log)
    if errors:
        raise ExperimentError(f"{len(errors)} trial(s) failed after retries:\n" + "\n".join(errors))
    return summary


def resume_experiment(uri: str, log: Callable[[str], None] = print) -> dict:
    """Continue an interrupted experiment from its storage alone (`slmrl-ray resume`)."""
    root = Storage.from_uri(uri)
    manifest = root.child(MANIFEST)
    if not manifest.is_file():
        raise ExperimentError(f"no {MANIFEST} under {root.uri}: not an slmrl-ray experiment")
    saved = manifest.read_json()
    raw = saved["tune_config"]
    experiment = experiment_from_dict(raw, source=saved["source"], base=saved["pipeline"])
    if experiment_root(experiment).uri != root.uri:  # moved, or reached under another URI
        moved = experiment_from_dict({**raw, "storage_path": parent_uri(root.uri)}, source=saved["source"],
                                     base=saved["pipeline"])
        experiment = dataclasses.replace(moved, raw=raw)
    return run_experiment(experiment, saved["kind"], log)


def load_records(root: Storage) -> list[dict]:
    folder = root.child("results")
    return [folder.child(name).read_json() for name in folder.list() if name.endswith(".json")]


def write_report(root: Storage, log: Callable[[str], None] = print) -> dict:
    """Results table, plots and registry.json from the cell records, into `<root>/report/`."""
    from slmrl_ray.tuning.report import format_summary, write_report as write_files

    records = load_records(root)
    with tempfile.TemporaryDirectory(prefix="slmrl-report-") as folder:
        summary = write_files(records, Path(folder))
        root.child("report").upload(Path(folder))
    log(format_summary(summary["rows"]) if summary["rows"] else "no finished cells yet")
    log(f"report: {root.child('report').uri}")
    return summary


def stage_executions(root: Storage) -> list[dict]:
    """Every recorded stage execution of the experiment at `root` (see `ArtifactStore.executions`)."""
    custom = root.child(MANIFEST).read_json()["tune_config"].get("artifacts_path")
    return ArtifactStore(artifacts_storage(root, custom)).executions()
