"""The `ppo/` stage folder and the PPO training state: in-memory snapshots for rollback,
on-disk checkpoints for resume, and the step log with its summary. This module owns the
folder's format; PPO, GRPO/RLOO (`trl_rl`), the Tune trial and the benchmarks call it:

    ppo/log.jsonl                        one record per step (`append_log`, `read_log`, `load_log`)
    ppo/checkpoints/step-NNNNNN/         the newest checkpoints (`save_checkpoint`, `adopt_checkpoint`)
        state.json                       fingerprint, step, counters (+ optimiser metadata for PPO)

The whole training state is one unit: trainable weights (LoRA + value head), optimiser
state, running score statistics, KL controller, step and rollback counters. A rollback
restores all of it (the original code restored weights but not the optimiser; SPEC 1.5).

Checkpoints are safetensors (tensors) plus JSON (everything else); nothing is pickled.
The Adam state is flattened into `state.<param index>.<key>` tensors.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slmrl_ray.config import PPOConfig
from slmrl_ray.rl_math import AdaptiveKLController, FixedKLController, RunningMoments

LOG = "log.jsonl"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
KEEP_CHECKPOINTS = 2


class NonFiniteError(RuntimeError):
    """A step produced NaN/Inf (scores, log-probabilities, loss, gradients or weights)."""


class PPODivergedError(RuntimeError):
    """More non-finite steps than `ppo.max_rollbacks`: the run cannot be trusted."""


@dataclass
class PPOState:
    step: int  # completed (attempted) steps
    rollbacks: int
    moments: RunningMoments
    kl_controller: object  # AdaptiveKLController | FixedKLController


def initial_state(cfg: PPOConfig) -> PPOState:
    """Step 0: empty score statistics, the KL controller the config asks for (adaptive or fixed)."""
    kl_controller = (
        AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.kl_target is not None
        else FixedKLController(cfg.init_kl_coef)
    )
    return PPOState(step=0, rollbacks=0, moments=RunningMoments(), kl_controller=kl_controller)


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: PPOState) -> dict:
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "moments": state.moments.state_dict(),
        "kl_controller": state.kl_controller.state_dict(),
    }


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: PPOState, saved: dict) -> None:
    """Restore a snapshot in place (the counters stay: a rollback is itself history)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    state.moments.load_state_dict(saved["moments"])
    state.kl_controller.load_state_dict(saved["kl_controller"])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: PPOState, fingerprint: str
) -> Path:
    """Write `folder/step-XXXXXX` atomically and return it."""
    target = folder / checkpoint_name(state.step)
    scratch = folder / f".{checkpoint_name(state.step)}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, scratch / "trainable.safetensors")
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
    save_file(optimizer_tensors, scratch / "optimizer.safetensors")
    meta = {
        "fingerprint": fingerprint,
        "step": state.step,
        "rollbacks": state.rollbacks,
        "moments": state.moments.state_dict(),
        "kl_controller": state.kl_controller.state_dict(),
        "optimizer": optimizer_meta,
    }
    (scratch / STATE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target


def latest_checkpoint(folder: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint written for this config, if any."""
    candidates = sorted(folder.glob("step-*"), reverse=True) if folder.exists() else []
    for candidate in candidates:
        meta_path = candidate / STATE
        if meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == fingerprint:
            return candidate
    return None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: PPOState
) -> None:
    meta = json.loads((path / STATE).read_text())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(path / "trainable.safetensors").items():
            params[name].copy_(value)
    # load_state_dict moves each tensor to its parameter's device (and keeps Adam's step on the CPU).
    tensors = load_file(path / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    state.step, state.rollbacks = meta["step"], meta["rollbacks"]
    state.moments.load_state_dict(meta["moments"])
    state.kl_controller.load_state_dict(meta["kl_controller"])


def prune_checkpoints(folder: Path, keep: int) -> None:
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- the stage folder

def log_path(stage_dir: Path) -> Path:
    return stage_dir / LOG


def checkpoints_dir(stage_dir: Path) -> Path:
    return stage_dir / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint folder was written at (its `state.json`)."""
    return json.loads((checkpoint / STATE).read_text())["step"]


def adopt_checkpoint(source: Path, stage_dir: Path, meta: dict) -> Path:
    """Move a trainer's own checkpoint folder (TRL's) into `checkpoints/step-NNNNNN` with our
    `state.json` (`meta` holds at least fingerprint and step); keep the newest two."""
    (source / STATE).write_text(json.dumps(meta, indent=2))
    target = checkpoints_dir(stage_dir) / checkpoint_name(meta["step"])
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(source, target)  # the same file system: a complete checkpoint or none
    prune_checkpoints(target.parent, keep=KEEP_CHECKPOINTS)
    return target


def export_checkpoint(checkpoint: Path, stage_dir: Path, folder: Path) -> None:
    """Copy a checkpoint and the step log into `folder` (a Tune checkpoint's `ppo/`)."""
    shutil.copytree(checkpoint, folder / checkpoint.name)
    if log_path(stage_dir).exists():
        shutil.copy2(log_path(stage_dir), folder / LOG)


def import_checkpoint(folder: Path, stage_dir: Path) -> int:
    """Put the newest checkpoint in `folder` (written by `export_checkpoint`) and its log where
    the stage looks on resume; returns its step (0 when `folder` holds none)."""
    states = sorted(folder.glob("step-*")) if folder.exists() else []
    if not states:
        return 0
    target = checkpoints_dir(stage_dir) / states[-1].name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(states[-1], target)
    if (folder / LOG).exists():
        shutil.copy2(folder / LOG, log_path(stage_dir))
    return checkpoint_step(target)


# ----------------------------------------------------------------------------- the step log

def read_log(path: Path, upto: int) -> list[dict]:
    """The per-step log up to `upto`, rewritten so a resumed run does not repeat steps."""
    if not path.exists():
        return []
    kept = [r for r in load_log(path) if r["step"] <= upto]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def load_log(path: Path) -> list[dict]:
    """Every record of the step log, as written (nothing is rewritten)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_log(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def summarize_log(history: list[dict]) -> dict:
    """The stage's training figures: means over the first and last fifth of the healthy steps."""
    healthy = [h for h in history if "reward_mean" in h]
    window = max(1, len(healthy) // 5)
    first, last = healthy[:window], healthy[-window:]
    return {
        "reward_first": _mean(h["reward_mean"] for h in first),
        "reward_last": _mean(h["reward_mean"] for h in last),
        "kl_last": _mean(h["kl"] for h in last),
        "response_length_last": _mean(h["response_length"] for h in last),
    }


def finish_metrics(steps: int, rollbacks: int, resumed_from: int, history: list[dict], kl_coef_last: float,
                   lora_max_change: float, dtype: str) -> dict:
    """The stage's metrics.json figures that PPO and GRPO/RLOO share, in this order."""
    return {
        "steps": steps,
        "rollbacks": rollbacks,
        "resumed_from_step": resumed_from,
        **summarize_log(history),
        "kl_coef_last": kl_coef_last,
        "lora_max_change": lora_max_change,
        "dtype": dtype,
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
