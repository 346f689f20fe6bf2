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
- for searches, the objective: while PPO runs, the reward gain on its own rollouts
  (for ASHA's pruning); at the end, the held-out gain from the evaluation stage.
A diverged PPO run ends the trial with `diverged_score`, never a good score.
When the cell is done, its record (metrics, artifact URIs, params, objective) goes to
`<experiment>/results/<trial_id>.json`, where `slmrl-ray report` reads it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from slmrl_ray.artifacts import RunPaths, stage_fingerprints, write_json
from slmrl_ray.config import PipelineConfig
from slmrl_ray.stages.ppo_state import (
    NonFiniteError,
    PPODivergedError,
    export_checkpoint,
    import_checkpoint,
    load_log,
    log_path,
)
from slmrl_ray.storage import ArtifactStore, Storage
from slmrl_ray.tuning.config import Objective, TuneExperiment


class InjectedFault(RuntimeError):
    """Raised by `faults.crash_at_ppo_step` to rehearse recovery."""


def scratch_dir(experiment: str, trial_id: str) -> Path:
    """A node-local working folder, emptied at the start of every attempt.

    Starting empty is the point: an attempt must resume from storage and its Tune
    checkpoint alone, exactly as it would on another node.
    """
    root = Path(os.environ.get("SLMRL_RAY_SCRATCH") or tempfile.gettempdir())
    folder = root / "slmrl-ray" / experiment / trial_id
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


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

    def running(self) -> dict[str, float]:
        window = self.objective.window
        if not self.rewards:
            return {"objective": math.nan, "reward_gain": math.nan, "kl": math.nan}
        gain = _mean(self.rewards[-window:]) - _mean(self.rewards[:window])
        kl = _mean(self.kls[-window:])
        return {"objective": gain - self.objective.kl_penalty * kl, "reward_gain": gain, "kl": kl}

    def final(self, evaluation: dict, ppo_metrics: dict) -> dict[str, float]:
        kl = ppo_metrics["kl_last"]
        gain = evaluation["judge"]["delta"] if self.objective.score == "judge" else evaluation["delta_reward"]
        return {"objective": gain - self.objective.kl_penalty * kl, "reward_gain": gain, "kl": kl}

    def diverged(self) -> dict[str, float]:
        score = self.objective.diverged_score
        return {"objective": score, "reward_gain": score, "kl": -score}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class TuneReporter:
    """The pipeline's `report`, forwarded to `tune.report` with checkpoints (see module docstring)."""

    def __init__(self, paths: RunPaths, tracker: ObjectiveTracker | None, cell: str,
                 crash_at_ppo_step: int | None) -> None:
        self.paths = paths
        self.tracker = tracker
        self.cell = cell
        self.crash_at_ppo_step = crash_at_ppo_step
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

    def _fill_checkpoint(self, folder: Path, ppo_state: Path | None) -> None:
        self._count += 1
        write_json(folder / "progress.json", {"stages_done": self.stages_done, "sequence": self._count})
        if ppo_state is not None:
            export_checkpoint(ppo_state, self.paths.ppo, folder / "ppo")


def cell_trial(params: dict[str, Any], experiment: TuneExperiment, kind: str,
               stages: tuple[str, ...], storage_uri: str, artifacts_uri: str) -> None:
    """The Tune function trainable: `params` holds the cell and, in a search, the sampled values."""
    import ray
    import torch
    from ray import tune

    from slmrl_ray.pipeline import run_pipeline

    context = tune.get_context()
    trial_id, cell = context.get_trial_id(), params["cell"]
    torch.set_num_threads(max(1, int(context.get_trial_resources().required_resources.get("CPU", 1))))
    sampled = {**params.get("search", {}), **params.get("grid", {})}  # a search's samples, a grid's variant
    scratch = scratch_dir(experiment.config.name, trial_id)
    config = experiment.cell_config(cell, sampled, output_dir=str(scratch))
    paths = RunPaths.for_config(config)
    paths.root.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(Storage.from_uri(artifacts_uri), who=trial_id, node=ray.get_runtime_context().get_node_id())

    resumed_step = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resumed_step = restore_ppo_checkpoint(Path(folder), paths)
    faults = experiment.config.faults
    crash = faults.crash_at_ppo_step if checkpoint is None and (not faults.cells or cell in faults.cells) else None
    tracker = ObjectiveTracker(experiment.config.search.objective) if kind == "search" else None
    if tracker is not None:
        tracker.load_log(log_path(paths.ppo))
    reporter = TuneReporter(paths, tracker, cell, crash)
    record = CellRecord(experiment.config.name, kind, trial_id, config, store, sampled, resumed_step)

    try:
        results = run_pipeline(config, stages, report=reporter, store=store, log=lambda line: print(f"[{cell}] {line}"))
    except (PPODivergedError, NonFiniteError) as error:
        if tracker is None:  # a grid cell that diverged is an error for the user to see
            raise
        final = {"cell": cell, "diverged": True, "error": str(error), **tracker.diverged()}
        record.write(storage_uri, {}, reporter.stage_times, final["objective"], diverged=True)
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
    shutil.rmtree(scratch, ignore_errors=True)  # everything it held is in storage now


class CellRecord:
    """The record of a finished cell that `slmrl-ray report` and the serving registry read."""

    def __init__(self, experiment: str, kind: str, trial_id: str, config: PipelineConfig,
                 store: ArtifactStore, sampled: dict, resumed_step: int) -> None:
        self.experiment, self.kind, self.trial_id = experiment, kind, trial_id
        self.config, self.store, self.sampled, self.resumed_step = config, store, sampled, resumed_step
        self.started = time.time()
        import ray
        from ray import tune

        self.resources = tune.get_context().get_trial_resources().required_resources
        self.gpu_ids = [str(i) for i in ray.get_gpu_ids()]

    def write(self, storage_uri: str, results: dict, stage_times: dict[str, float],
              objective: float | None, diverged: bool) -> None:
        config = self.config
        record = {
            "experiment": self.experiment,
            "kind": self.kind,
            "trial_id": self.trial_id,
            "model": config.model,
            "corpus": config.corpus,
            "params": self.sampled,
            "objective": objective,
            "diverged": diverged,
            "evaluation": results.get("eval"),
            "artifacts": {s: self.store.stage_location(config, s).uri for s in ("sft", "reward", "ppo", "eval")},
            "metrics": {s: results[s] for s in ("data", "sft", "reward", "ppo") if s in results},
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
