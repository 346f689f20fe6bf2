"""One Tune trial: one cell's pipeline (or its PPO + evaluation, in a search), resumable anywhere.

`cell_trial` is the function trainable. It runs `slmrl_ray.pipeline.run_pipeline`
unchanged, in a fresh scratch folder on whatever node Ray chose, with three things
plugged in:
- an `ArtifactStore` in the experiment's storage: a stage finished by any earlier
  attempt or trial (same fingerprint) is fetched, not re-run, and every stage this
  attempt finishes is published there;
- a reporter that forwards metrics to `tune.report`, with a Tune checkpoint after every
  stage and at every PPO checkpoint (the PPO state plus its step log), so a retried
  trial, here or on another node, resumes PPO mid-way;
- for searches, two numbers under two names: while PPO runs, `running_objective`, the
  reward gain on its own rollouts (ASHA's metric); at the end, `objective`, the gain on the
  validation prompts (Optuna's metric, NaN until then: a trial ASHA stops never has one,
  and reaches Optuna as pruned).
A diverged PPO run (or a failed training check) is recorded once (`diverged`, with its
error) and ends the trial without a retry; in a search it scores `diverged_score`, never a
good score. In a prepare trial it ends the trial too, and the phase records the failure.
When the cell is done, its record (metrics, fingerprints, params, objective, the cell's own
settings with their provenance, library versions) goes to
`<experiment>/results/<trial_id>.json`, where `slmrl-ray report` reads it. The scratch
folder goes however the trial ends (done, stopped, failed); one left by a killed process
is pruned by the next attempt on that node.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from slmrl_ray.artifacts import RunPaths, stage_fingerprints, write_json
from slmrl_ray.checks import TrainingCheckError
from slmrl_ray.config import PipelineConfig
from slmrl_ray.lease import pid_alive
from slmrl_ray.stages.ppo_state import (
    NonFiniteError,
    PPODivergedError,
    export_checkpoint,
    import_checkpoint,
    load_log,
    log_path,
)
from slmrl_ray.storage import ArtifactStore, Storage, file_digests
from slmrl_ray.tuning.budgets import library_versions
from slmrl_ray.tuning.config import Objective, TuneExperiment


class InjectedFault(RuntimeError):
    """Raised by `faults.crash_at_ppo_step` to rehearse recovery."""


class TrialDeviceError(RuntimeError):
    """Ray gave the trial a GPU that torch cannot see: training would silently run on the CPU."""


OWNER = ".owner.json"
MANIFEST = "manifest.json"  # in every Tune checkpoint: its files (`file_digests`), to tell a complete one


def scratch_root() -> Path:
    return Path(os.environ.get("SLMRL_RAY_SCRATCH") or tempfile.gettempdir()) / "slmrl-ray"


def scratch_dir(experiment: str, trial_id: str) -> Path:
    """A node-local working folder, emptied at the start of every attempt.

    Starting empty is the point: an attempt must resume from storage and its Tune
    checkpoint alone, exactly as it would on another node. Scratch folders that no live
    trial owns (a killed actor's, or an earlier trial's in this reused actor) go first.
    """
    prune_scratch()
    folder = scratch_root() / experiment / trial_id
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "trial": trial_id}))
    return folder


def prune_scratch() -> list[Path]:
    """Remove this node's scratch folders whose owner is dead or is this process (one trial at a time)."""
    removed = []
    for owner_file in scratch_root().glob(f"*/*/{OWNER}"):
        try:
            owner = json.loads(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") != socket.gethostname():
            continue
        if owner.get("pid") == os.getpid() or not pid_alive(owner.get("pid")):
            shutil.rmtree(owner_file.parent, ignore_errors=True)
            removed.append(owner_file.parent)
    return removed


def check_trial_device(gpus_assigned: float, allow_logical_gpus: bool) -> None:
    """Fail loudly when Ray assigned GPUs but torch sees none (a CPU wheel, a driver mismatch)."""
    import torch

    if gpus_assigned <= 0 or torch.cuda.is_available() or allow_logical_gpus:
        return
    raise TrialDeviceError(
        f"Ray gave this trial {gpus_assigned:g} GPU(s) (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) but torch {torch.__version__} sees no CUDA device "
        f"(built for CUDA {torch.version.cuda}); refusing to train on the CPU. Install a CUDA build of torch "
        f"on the GPU nodes, or ask for no GPU (resources.gpu=0)"
    )


def restore_ppo_checkpoint(checkpoint_dir: Path, paths: RunPaths) -> int:
    """Put a Tune checkpoint's PPO state and log where `run_ppo` looks; returns its step."""
    return import_checkpoint(checkpoint_dir / "ppo", paths.ppo)


class ObjectiveTracker:
    """The search objective, from PPO's per-step stats and then from the evaluation."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.rewards: list[float] = []
        self.kls: list[float] = []

    def observe(self, metrics: dict[str, Any]) -> None:
        if "ppo/reward_mean" in metrics:
            self.rewards.append(metrics["ppo/reward_mean"])
            self.kls.append(metrics["ppo/kl"])

    def load_log(self, log_path: Path) -> None:
        """After a resume: the steps before the checkpoint, from PPO's own log."""
        for record in load_log(log_path):
            if "reward_mean" in record:
                self.rewards.append(record["reward_mean"])
                self.kls.append(record["kl"])

    # The final numbers, as Optuna and the report see them; NaN until the evaluation (Tune
    # wants every metric in every result).
    PENDING = {"objective": math.nan, "reward_gain": math.nan, "kl": math.nan}

    def running(self) -> dict[str, float]:
        """ASHA's metric: the gain on PPO's own rollouts so far, less the KL penalty."""
        window = self.objective.window
        if not self.rewards:
            return {**self.PENDING, "running_objective": math.nan, "running_reward_gain": math.nan,
                    "running_kl": math.nan}
        gain = _mean(self.rewards[-window:]) - _mean(self.rewards[:window])
        kl = _mean(self.kls[-window:])
        return {**self.PENDING, "running_objective": gain - self.objective.kl_penalty * kl,
                "running_reward_gain": gain, "running_kl": kl}

    def final(self, evaluation: dict, ppo_metrics: dict) -> dict[str, float]:
        """Optuna's metric: the gain on the validation prompts (`eval.validation_fraction`)."""
        kl = ppo_metrics["kl_last"]
        scored = evaluation.get("validation") or evaluation
        gain = scored["judge"]["delta"] if self.objective.score == "judge" else scored["delta_reward"]
        return {**self.running(), "objective": gain - self.objective.kl_penalty * kl, "reward_gain": gain,
                "kl": kl, "objective_final": True}

    def diverged(self) -> dict[str, float]:
        score = self.objective.diverged_score
        return {**self.running(), "objective": score, "reward_gain": score, "kl": -score, "objective_final": True}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class TuneReporter:
    """The pipeline's `report`, forwarded to `tune.report` with checkpoints (see module docstring)."""

    def __init__(self, paths: RunPaths, tracker: ObjectiveTracker | None, cell: str,
                 crash_at_ppo_step: int | None, diverge_at_ppo_step: int | None = None) -> None:
        self.paths = paths
        self.tracker = tracker
        self.cell = cell
        self.crash_at_ppo_step = crash_at_ppo_step
        self.diverge_at_ppo_step = diverge_at_ppo_step
        self.stages_done: dict[str, bool] = {}  # stage -> run by this attempt (else fetched/skipped)
        self.stage_times: dict[str, float] = {}
        self._count = 0

    def __call__(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        from ray import tune

        result = {"cell": self.cell, **metrics, "ppo_step": int(metrics.get("ppo/step", 0))}
        if self.tracker is not None:
            self.tracker.observe(metrics)
            result.update(self.tracker.running())
        if "stage_done" in metrics:
            stage = metrics["stage_done"]
            self.stages_done[stage] = metrics["stage_executed"]
            if metrics["stage_executed"]:
                self.stage_times[stage] = round(metrics[f"{stage}/wall_time_s"], 3)
            result["stages_done"] = len(self.stages_done)
        if checkpoint is None and "stage_done" not in metrics:
            tune.report(result)
        else:
            with tempfile.TemporaryDirectory(dir=self.paths.root, prefix=".tune-checkpoint-") as folder:
                self._fill_checkpoint(Path(folder), checkpoint)
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))
        if self.crash_at_ppo_step is not None and result["ppo_step"] == self.crash_at_ppo_step:
            raise InjectedFault(f"injected fault after PPO step {self.crash_at_ppo_step} ({self.cell})")
        if self.diverge_at_ppo_step is not None and result["ppo_step"] == self.diverge_at_ppo_step:
            raise PPODivergedError(f"injected divergence at PPO step {self.diverge_at_ppo_step} ({self.cell})")

    def _fill_checkpoint(self, folder: Path, ppo_state: Path | None) -> None:
        self._count += 1
        write_json(folder / "progress.json", {"stages_done": self.stages_done, "sequence": self._count})
        if ppo_state is not None:
            export_checkpoint(ppo_state, self.paths.ppo, folder / "ppo")
        write_json(folder / MANIFEST, file_digests(folder))


def checkpoint_complete(filesystem, path: str) -> bool:
    """Whether the Tune checkpoint at `path` holds every file its manifest lists, at its size."""
    import pyarrow.fs as pafs

    try:
        with filesystem.open_input_stream(f"{path}/{MANIFEST}") as stream:
            files = json.loads(stream.read())
    except (OSError, ValueError):
        return False
    infos = filesystem.get_file_info([f"{path}/{name}" for name in files])
    return all(info.type == pafs.FileType.File and info.size == files[name]["size"] for name, info in zip(files, infos))


def newest_complete_checkpoint(filesystem, trial_path: str) -> tuple[int, str] | None:
    """The index and path of the newest complete `checkpoint_NNNNNN` in a trial's folder."""
    import pyarrow.fs as pafs

    found = []
    for info in filesystem.get_file_info(pafs.FileSelector(trial_path, allow_not_found=True)):
        match = re.fullmatch(r"checkpoint_(\d+)", info.base_name)
        if match and info.type == pafs.FileType.Directory:
            found.append((int(match.group(1)), info.path))
    return next(((index, path) for index, path in sorted(found, reverse=True)
                 if checkpoint_complete(filesystem, path)), None)


def resumable(trainable):
    """The function `trainable` as Tune's trainable class, with a restore that survives a
    checkpoint Tune itself deleted.

    Tune saves its experiment state (each trial's latest checkpoint) every so often, and
    deletes old checkpoints (`keep_checkpoints`) as new ones arrive. A driver killed between
    the two leaves a state naming a deleted checkpoint, and Tune's restore fails on every
    retry. Here a missing checkpoint falls back to the newest complete one (by its manifest) in
    the trial's folder (what Ray's `TUNE_FALLBACK_TO_LATEST_CHECKPOINT` did before its
    storage rewrite), and with none left the trial starts afresh: its finished stages come
    back from the artifact store, only PPO reruns.
    """
    import pyarrow.fs as pafs
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable.function_trainable import wrap_function

    class ResumableTrainable(wrap_function(trainable)):
        def restore(self, checkpoint_path):
            if not isinstance(checkpoint_path, _TrainingResult):
                return super().restore(checkpoint_path)
            checkpoint = checkpoint_path.checkpoint
            filesystem = checkpoint.filesystem
            if filesystem.get_file_info(checkpoint.path).type != pafs.FileType.NotFound:
                return super().restore(checkpoint_path)  # Tune registers a checkpoint once it is persisted
            newest = newest_complete_checkpoint(filesystem, checkpoint.path.rstrip("/").rsplit("/", 1)[0])
            if newest is None:
                print(f"[resume] checkpoint {checkpoint.path} is gone and no complete one is left: "
                      "starting the trial afresh")
                return None
            index, path = newest
            print(f"[resume] checkpoint {checkpoint.path} is gone: resuming from {path}")
            self._storage.current_checkpoint_index = max(self._storage.current_checkpoint_index, index)
            return super().restore(_TrainingResult(tune.Checkpoint(path, filesystem), checkpoint_path.metrics))

    ResumableTrainable.__name__ = ResumableTrainable._name  # trials stay named after the function
    return ResumableTrainable


def cell_trial(params: dict[str, Any], experiment: TuneExperiment, kind: str,
               stages: tuple[str, ...], storage_uri: str, artifacts_uri: str) -> None:
    """The Tune function trainable: `params` holds the cell (a grid's `unit`: the cell and its
    variant's values) and, in a search, the sampled values."""
    import torch
    from ray import tune

    unit = params.get("unit") or {"cell": params["cell"]}
    context = tune.get_context()
    trial_id, cell = context.get_trial_id(), unit["cell"]
    resources = context.get_trial_resources().required_resources
    check_trial_device(resources.get("GPU", 0), experiment.config.resources.allow_logical_gpus)
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    sampled = {**params.get("search", {}), **(unit.get("grid") or {})}  # a search's samples, a grid's variant
    scratch = scratch_dir(experiment.config.name, trial_id)
    try:
        _run_cell(experiment, kind, stages, storage_uri, artifacts_uri, trial_id, cell, sampled, scratch)
    finally:  # done, failed, or stopped by the scheduler (Tune ends a stopped trial's thread at its next report)
        shutil.rmtree(scratch, ignore_errors=True)


def _run_cell(experiment: TuneExperiment, kind: str, stages: tuple[str, ...], storage_uri: str,
              artifacts_uri: str, trial_id: str, cell: str, sampled: dict, scratch: Path) -> None:
    import ray
    from ray import tune

    from slmrl_ray.pipeline import run_pipeline

    overrides = dict(sampled)
    if kind == "search" and experiment.config.search is not None:
        overrides["eval.validation_fraction"] = experiment.config.search.validation_fraction
    config = experiment.cell_config(cell, overrides, output_dir=str(scratch))
    paths = RunPaths.for_config(config)
    paths.root.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(Storage.from_uri(artifacts_uri), who=trial_id, node=ray.get_runtime_context().get_node_id())

    resumed_step = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resumed_step = restore_ppo_checkpoint(Path(folder), paths)
    faults = experiment.config.faults
    faulty = not faults.cells or cell in faults.cells
    crash = faults.crash_at_ppo_step if checkpoint is None and faulty else None
    tracker = ObjectiveTracker(experiment.config.search.objective) if kind == "search" else None
    if tracker is not None:
        tracker.load_log(log_path(paths.ppo))
    reporter = TuneReporter(paths, tracker, cell, crash, faults.diverge_at_ppo_step if faulty else None)
    record = CellRecord(experiment.config.name, kind, trial_id, config, sampled, resumed_step,
                        experiment.cell_provenance(cell))

    try:
        results = run_pipeline(config, stages, report=reporter, store=store, log=lambda line: print(f"[{cell}] {line}"))
    except (PPODivergedError, NonFiniteError, TrainingCheckError) as error:
        # Recorded once, and the trial ends: a retry with the same seed would diverge (or
        # collapse to empty answers) again. A prepare trial's failure is the phase's to record
        # (`fit_phase`), and the variants built on it are skipped.
        if kind == "prepare":
            tune.report({"cell": cell, "prepare_failed": f"{type(error).__name__}: {error}"})
            return
        final = {"cell": cell, "diverged": True, "error": str(error), "done_cell": True,
                 **(tracker.diverged() if tracker is not None else {})}
        record.write(storage_uri, {}, reporter.stage_times, final.get("objective"), diverged=True,
                     error=f"{type(error).__name__}: {error}")
        tune.report(final)
        return
    if kind == "prepare":  # a search's first phase: nothing to rank yet
        return
    final = {"cell": cell, "done_cell": True}
    if "eval" in results:
        final.update(ppo_step=int(results["ppo"]["steps"]), delta_reward=results["eval"]["delta_reward"],
                     win_rate=results["eval"]["analytical_win_rate"])
        if tracker is not None:
            final.update(tracker.final(results["eval"], results["ppo"]))
    record.write(storage_uri, results, reporter.stage_times, final.get("objective"), diverged=False)
    tune.report(final)


class CellRecord:
    """The record of a finished cell that `slmrl-ray report` and the serving registry read."""

    def __init__(self, experiment: str, kind: str, trial_id: str, config: PipelineConfig,
                 sampled: dict, resumed_step: int, cell_overrides: dict | None = None) -> None:
        self.experiment, self.kind, self.trial_id = experiment, kind, trial_id
        self.config, self.sampled, self.resumed_step = config, sampled, resumed_step
        self.cell_overrides = cell_overrides  # the cell's own settings and where they came from
        self.started = time.time()
        import ray
        from ray import tune

        self.resources = tune.get_context().get_trial_resources().required_resources
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]

    def write(self, storage_uri: str, results: dict, stage_times: dict[str, float],
              objective: float | None, diverged: bool, error: str | None = None) -> None:
        config = self.config
        record = {
            "experiment": self.experiment,
            "kind": self.kind,
            "trial_id": self.trial_id,
            "model": config.model,
            "corpus": config.corpus,
            "params": self.sampled,
            "cell_overrides": self.cell_overrides,  # a search's budgets entry (with provenance), a hand pick, or None
            "versions": library_versions(),
            "objective": objective,
            "diverged": diverged,
            "error": error,
            "evaluation": results.get("eval"),
            "metrics": {s: results[s] for s in ("data", "sft", "reward", "ppo") if s in results},
            # Artifacts are found by stage and fingerprint under the experiment's root, never by a URI.
            "fingerprints": stage_fingerprints(config),
            "wall_time_s": stage_times,  # the stages this attempt ran (fetched ones are absent)
            "resumed_from_ppo_step": self.resumed_step,
            "resources": self.resources,
            "gpu_ids": self.gpu_ids,
            "started_at": self.started,
            "ended_at": time.time(),
            "trial_wall_time_s": round(time.time() - self.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        Storage.from_uri(storage_uri).child("results", f"{self.trial_id}.json").write_json(record)
