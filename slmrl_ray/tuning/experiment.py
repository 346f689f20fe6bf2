"""The Ray Tune driver: a grid over cells, an Optuna search per cell, resume, and the report.

Storage layout, under `<storage_path>/<name>/` (any URI `slmrl_ray.storage` takes):

    experiment.json            what was asked (kind + the tune config): `resume` needs only this
    driver.lease/<n>           the running driver's lease (generation n): a second driver refuses to start
    artifacts/                 committed stage folders by fingerprint (unless `artifacts_path`)
    grid/                      a plain grid's Tune experiment (trial checkpoints, results, TensorBoard)
    prepare-<model>-<corpus>/  a search's or an axes grid's first phase for one cell: data, SFT and
                               RM once per distinct fingerprint (variants that share them share it)
    search-<model>-<corpus>/   a search's Optuna study for one cell (one Tuner per cell, since
                               OptunaSearch rejects grid_search and ASHA must compare like with like)
    grid-<model>-<corpus>/     an axes grid's variants of one cell
    results/<trial_id>.json    one record per finished (or diverged) cell trial
    failures/<phase>-<id>.json a trial that failed after its retries, or a cell skipped for it
    report/                    results.{md,csv,json}, PNG plots, registry.json; a search's budgets.yaml

Each phase is a `Tuner`. A search (or an axes grid) has a lane per cell, its prepare then
its search; the lanes run side by side, each in a Ray task on the driver's node, sharing
the cluster. `resume` walks the phases again, restoring
each one whose Tune state exists (`Tuner.restore`, errored trials resumed) and starting the
others, so a driver killed at any point continues where the storage says it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slmrl_ray.artifacts import stage_fingerprints
from slmrl_ray.config import ConfigError
from slmrl_ray.lease import DriverLease, LeaseHeld
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


def phases(experiment: TuneExperiment, kind: str) -> list[list[Phase]]:
    """The experiment's lanes: each runs its phases in order, and the lanes run side by side.

    A plain grid is one lane, one Tuner over every cell. A search, and a grid with `grid:`
    axes, get a lane per cell: its `prepare` (data, SFT and reward models, once per distinct
    fingerprint), then its search or its variants; no cell waits for another cell's prepare.
    """
    stages = experiment.config.stages
    if kind == "grid" and not experiment.config.grid:
        return [[Phase("grid", "grid", experiment.cells, stages)]]
    upstream = tuple(s for s in stages if s in UPSTREAM)
    lanes = []
    for cell in experiment.cells:
        slug = cell.replace("/", "-")
        lanes.append([Phase(f"prepare-{slug}", "prepare", (cell,), upstream),
                      Phase(f"{kind}-{slug}", kind, (cell,), stages)])
    return lanes


def variants(experiment: TuneExperiment) -> list[dict]:
    """A grid's extra-axis combinations (`[{}]` without `grid:`), in the config's order."""
    combos: list[dict] = [{}]
    for key, values in experiment.config.grid.items():
        combos = [{**combo, key: value} for combo in combos for value in values]
    return combos


def units(experiment: TuneExperiment, phase: Phase) -> list[dict]:
    """The trials a grid or prepare phase runs, as `{"cell", "grid"}`.

    A prepare phase keeps one unit per distinct upstream fingerprint: variants that change
    only PPO share one, variants that change SFT or the reward model get their own, and no
    upstream stage is built twice.
    """
    every = [{"cell": cell, "grid": variant} for cell in phase.cells for variant in variants(experiment)]
    if phase.kind != "prepare":
        return every
    seen: dict[str, dict] = {}
    for unit in every:
        seen.setdefault(upstream_fingerprint(experiment, unit, phase.stages), unit)
    return list(seen.values())


def upstream_fingerprint(experiment: TuneExperiment, unit: dict, stages: tuple[str, ...]) -> str:
    config = experiment.cell_config(unit["cell"], unit["grid"])
    last = [s for s in UPSTREAM if s in stages][-1]
    return stage_fingerprints(config)[last]


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

    from slmrl_ray.tuning.trial import cell_trial, resumable

    resources = experiment.config.resources
    trainable = tune.with_parameters(
        cell_trial,
        experiment=experiment,
        kind=phase.kind,
        stages=phase.stages,
        storage_uri=root.uri,
        artifacts_uri=artifacts.uri,
    )
    return tune.with_resources(resumable(trainable), {"cpu": resources.cpu, "gpu": resources.gpu})


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


def final_objective_optuna(**kwargs):
    """An `OptunaSearch` that learns only from final objectives.

    Tune hands the searcher every result; the running numbers (NaN `objective` until the
    evaluation) are not Optuna's business, and a trial that ends without a final objective
    (stopped by ASHA) goes to the study as PRUNED, not as a COMPLETE trial scored on
    something else.
    """
    from ray.tune.search.optuna import OptunaSearch

    class FinalObjectiveOptuna(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if result.get("objective_final"):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            # No result at all, not one without the metric: with a list of metrics (pareto)
            # OptunaSearch reads [None, None] as a value and tells the study COMPLETE, which
            # Optuna rejects, leaving the trial RUNNING in the study for good.
            if result and not result.get("objective_final"):
                result = None
            super().on_trial_complete(trial_id, result, error)

    return FinalObjectiveOptuna(**kwargs)


def asha_scheduler(steps: int, grace_period: int, reduction_factor: int):
    """ASHA over PPO steps with every rung before the last step, or None when no rung fits.

    Ray puts rungs at `grace x rf^k` up to `max_t`, so `max_t = steps` would put one at the
    last PPO step and stop a finished trial before its policy is evaluated. `max_t = steps - 1`
    keeps them all below; with `stop_last_trials=False` ASHA never stops a trial for reaching it.
    A search over `search.steps` passes its shortest choice: every rung lies below every trial's last step.
    """
    from ray.tune.schedulers import ASHAScheduler

    if steps - 1 < grace_period:
        return None
    return ASHAScheduler(
        time_attr="ppo_step", metric="running_objective", mode="max",
        max_t=steps - 1, grace_period=grace_period, reduction_factor=reduction_factor, stop_last_trials=False,
    )


def _search_tune_config(experiment: TuneExperiment, phase: Phase, index: int):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    search = experiment.config.search
    cell_config = experiment.cell_config(phase.cells[0])
    if search.objective.kind == "pareto":
        searcher = final_objective_optuna(metric=["reward_gain", "kl"], mode=["max", "min"], seed=search.seed + index)
        scheduler = None
    else:
        searcher = final_objective_optuna(metric="objective", mode="max", seed=search.seed + index)
        scheduler = asha_scheduler(min(search.steps or (cell_config.ppo.steps,)), search.scheduler.grace_period,
                                   search.scheduler.reduction_factor) if search.scheduler.kind == "asha" else None
    return tune.TuneConfig(
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent),
        scheduler=scheduler or FIFOScheduler(), num_samples=search.num_samples, reuse_actors=True,
    )


def _param_space(experiment: TuneExperiment, phase: Phase, todo: list[dict] | None) -> dict:
    from ray import tune

    if phase.kind == "grid" and not experiment.config.grid:  # a plain grid: trials named by their cell
        return {"cell": tune.grid_search([unit["cell"] for unit in todo])}
    if phase.kind != "search":
        return {"unit": tune.grid_search(todo)}
    search = experiment.config.search
    space = {SEARCHED_KEYS[name]: (tune.loguniform if r.log else tune.uniform)(r.low, r.high)
             for name, r in (("kl_coef", search.kl_coef), ("learning_rate", search.learning_rate))}
    if search.steps:  # a categorical choice (see `asha_scheduler`)
        space[SEARCHED_KEYS["steps"]] = tune.choice(list(search.steps))
    return {"cell": phase.cells[0], "search": space}


def _tuner(experiment: TuneExperiment, phase: Phase, index: int, root: Storage, artifacts: Storage,
           todo: list[dict] | None):
    from ray import tune

    trainable = _trainable(experiment, phase, root, artifacts)
    phase_path = root.child(phase.name)
    if tune.Tuner.can_restore(phase_path.path, storage_filesystem=root.filesystem):
        return tune.Tuner.restore(phase_path.path, trainable, resume_errored=True,
                                  storage_filesystem=root.filesystem), True
    if phase.kind == "search":
        tune_config = _search_tune_config(experiment, phase, index)
    else:
        tune_config = tune.TuneConfig(reuse_actors=True, max_concurrent_trials=experiment.config.max_concurrent_trials)
    return tune.Tuner(
        trainable,
        param_space=_param_space(experiment, phase, todo),
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
    """Run (or continue) a grid or a search; returns the report summary.

    Holds the experiment's driver lease throughout: a second driver (a resubmitted job, a
    `resume` while this one runs) refuses to start instead of racing this one.
    """
    if kind == "search" and experiment.config.search is None:
        raise ConfigError("search: a `search` section is required for `slmrl-ray search`")
    root = experiment_root(experiment)
    try:
        lease = DriverLease(root, what=f"slmrl-ray {kind}", on_lost=stop_driver).acquire()
    except LeaseHeld as error:
        raise ExperimentError(str(error)) from None
    try:
        write_manifest(experiment, kind, root)
        artifacts = artifacts_storage(root, experiment.config.artifacts_path)
        init_ray(experiment)
        failed = run_lanes(experiment, phases(experiment, kind), root, artifacts, log)
        write_failures(root, failed)
        summary = write_report(root, log)
    finally:
        lease.release()
    if failed:
        raise ExperimentError(f"{len(failed)} trial(s) failed after retries or were skipped:\n" +
                              "\n".join(f"{f['phase']}: {f['cell']} {f['params'] or ''}: {f['error']}" for f in failed))
    return summary


def stop_driver(lease: DriverLease) -> None:
    """A driver whose lease another driver took over (it stalled past the lease's expiry) exits
    at once: its trials die with it, and the new driver continues from storage. Running on, it
    would write the same trials, results and report as the new one."""
    import sys

    sys.stderr.write(f"slmrl-ray: another driver took {lease.root.uri} over ({lease.folder.uri}); "
                     f"this driver stops now\n")
    sys.stderr.flush()
    os._exit(1)


def run_lanes(experiment: TuneExperiment, lanes: list[list[Phase]], root: Storage, artifacts: Storage,
              log: Callable[[str], None]) -> list[dict]:
    """Every lane to the end; several at once in Ray tasks on this node. Returns the failures."""
    if len(lanes) == 1:
        return run_lane(experiment, lanes[0], 0, root.uri, artifacts.uri, log)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The Tune controllers must see the driver's local paths: on this node, asking for no CPU.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(run_lane)
    log(f"{len(lanes)} lanes side by side: " + "; ".join(" -> ".join(p.name for p in lane) for lane in lanes))
    results = ray.get([remote.remote(experiment, lane, index, root.uri, artifacts.uri)
                       for index, lane in enumerate(lanes)])
    return [failure for failures in results for failure in failures]


def run_lane(experiment: TuneExperiment, lane: list[Phase], index: int, root_uri: str, artifacts_uri: str,
             log: Callable[[str], None] = print) -> list[dict]:
    """A lane's phases in order; a unit whose prepare failed is skipped (and recorded as such)."""
    failed: list[dict] = []
    unprepared: set[str] = set()  # upstream fingerprints whose prepare trial failed
    for phase in lane:
        skipped = _skip_unprepared(experiment, phase, unprepared, failed)
        todo = None if phase.kind == "search" else [u for u in units(experiment, phase) if unit_key(u) not in skipped]
        if todo == [] or (phase.kind == "search" and skipped):
            log(f"[{phase.name}] skipped: its prepare failed")
            continue
        failures = fit_phase(experiment, phase, index, root_uri, artifacts_uri, todo, log)
        if phase.kind == "prepare":
            unprepared |= {upstream_fingerprint(experiment, json.loads(f["unit"]), phase.stages) for f in failures}
        failed += failures
    return failed


def _skip_unprepared(experiment: TuneExperiment, phase: Phase, unprepared: set[str], failed: list[dict]) -> set[str]:
    """The phase's units whose prepare failed (by upstream fingerprint): skipped, and said so.

    Both sides of the match are fingerprints computed here, on the driver. Asking the store
    instead would compare the driver's fingerprints with the trials' ones, and a CPU head
    resolves `precision: auto` unlike a GPU worker: every unit would look unprepared.
    """
    upstream = tuple(s for s in phase.stages if s in UPSTREAM)
    if phase.kind == "prepare" or not upstream or not unprepared:
        return set()
    skipped = set()
    for unit in units(experiment, phase):
        if upstream_fingerprint(experiment, unit, upstream) in unprepared:
            key = unit_key(unit)
            skipped.add(key)
            failed.append({"phase": phase.name, "unit": key, "cell": unit["cell"], "params": unit["grid"],
                           "state": "skipped", "error": "its data, SFT or reward model failed in `prepare`"})
    return skipped


def unit_key(unit: dict) -> str:
    return json.dumps({"cell": unit["cell"], "grid": unit.get("grid") or {}}, sort_keys=True)


def fit_phase(experiment: TuneExperiment, phase: Phase, index: int, root_uri: str, artifacts_uri: str,
              todo: list[dict] | None, log: Callable[[str], None] = print) -> list[dict]:
    """One phase's Tuner, fitted (or restored and continued); returns its failed trials."""
    root, artifacts = Storage.from_uri(root_uri), Storage.from_uri(artifacts_uri)
    started = time.perf_counter()
    tuner, restored = _tuner(experiment, phase, index, root, artifacts, todo)
    log(f"[{phase.name}] {'restored' if restored else 'starting'}: {len(phase.cells)} cell(s), "
        f"stages {', '.join(phase.stages)}")
    results = tuner.fit()
    log(f"[{phase.name}] finished in {time.perf_counter() - started:.1f} s, {results.num_errors} error(s)")
    failures = []
    for result in results:
        # A prepare trial whose training check failed ends without an error (a retry with the
        # same seed would fail it again) and says so in its last result.
        check = (result.metrics or {}).get("prepare_failed") if result.error is None else None
        if result.error is None and not check:
            continue
        config = result.config or {}
        unit = config.get("unit") or {"cell": config.get("cell", phase.cells[0]), "grid": {}}
        params = {**(unit.get("grid") or {}), **config.get("search", {})}
        failures.append({"phase": phase.name, "unit": unit_key(unit), "cell": unit["cell"], "params": params,
                         "state": "failed", "trial_id": Path(result.path).name if result.path else None,
                         "error": check[:500] if check else _last_line(result.error)})
    return failures


def _last_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:500]


def write_failures(root: Storage, failed: list[dict]) -> None:
    """One record per failed or skipped unit, under `failures/`, for the report."""
    for failure in failed:
        name = hashlib.sha256(f"{failure['phase']}|{failure['unit']}".encode()).hexdigest()[:12]
        root.child("failures", f"{failure['phase']}-{name}.json").write_json(failure)


def expected_units(saved: dict) -> list[dict]:
    """Every (cell, variant) an experiment's manifest asks for: what its report must list."""
    experiment = experiment_from_dict(saved["tune_config"], source=saved["source"], base=saved["pipeline"])
    if saved["kind"] == "search":
        return [{"cell": cell, "grid": {}} for cell in experiment.cells]
    return [{"cell": cell, "grid": variant} for cell in experiment.cells for variant in variants(experiment)]


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


def load_records(root: Storage, folder: str = "results") -> list[dict]:
    place = root.child(folder)
    return [place.child(name).read_json() for name in place.list() if name.endswith(".json")]


def placeholders(root: Storage, records: list[dict]) -> list[dict]:
    """A record for every expected unit `records` lack: failed (with its error) or not run."""
    saved = root.child(MANIFEST).read_json()
    kind = saved["kind"]
    done = {unit_key({"cell": f"{r['model']}/{r['corpus']}", "grid": r.get("params") if kind != "search" else {}})
            for r in records}
    failures = {f["unit"]: f for f in load_records(root, "failures")}
    missing = []
    for unit in expected_units(saved):
        key = unit_key(unit)
        if key in done:
            continue
        model, corpus = unit["cell"].split("/")
        failure = failures.get(key)
        state = "not run" if failure is None else failure["state"]
        reason = "not run yet" if failure is None else f"{failure['state']} in {failure['phase']}: {failure['error']}"
        missing.append({"experiment": saved["name"], "kind": kind, "model": model, "corpus": corpus,
                        "trial_id": failure.get("trial_id") if failure else None, "params": unit["grid"],
                        "state": state, "reason": reason, "evaluation": None})
    return missing


def write_report(root: Storage, log: Callable[[str], None] = print) -> dict:
    """Results table, plots, registry.json and a search's budgets.yaml from the cell records, into `<root>/report/`.

    Every cell and variant the manifest asks for gets a row: its results, or its state
    (diverged, failed, skipped, not run) and why.
    """
    from slmrl_ray.tuning.budgets_writer import write_budgets
    from slmrl_ray.tuning.report import format_summary, write_report as write_files

    records = load_records(root)
    records += placeholders(root, records)
    with tempfile.TemporaryDirectory(prefix="slmrl-report-") as folder:
        summary = write_files(records, Path(folder))
        write_budgets(root.child(MANIFEST).read_json(), root.uri, records, Path(folder))  # a search's only
        root.child("report").upload(Path(folder))
    log(format_summary(summary["rows"]) if summary["rows"] else "no finished cells yet")
    log(f"report: {root.child('report').uri}")
    return summary


def stage_executions(root: Storage) -> list[dict]:
    """Every recorded stage execution of the experiment at `root` (see `ArtifactStore.executions`)."""
    custom = root.child(MANIFEST).read_json()["tune_config"].get("artifacts_path")
    return ArtifactStore(artifacts_storage(root, custom)).executions()
