"""Stage artifact folders: how stages hand off to each other (and to Tune and Serve).

A run of one configuration lives in `<output_dir>/<model>/<corpus>/` with one folder per
stage (data, sft, reward, ppo, eval). A finished stage folder holds its outputs
(weights as safetensors), the resolved config as `config.json`, its metrics as
`metrics.json`, and last of all `stage.json`, whose fingerprint (a hash of the config
sections that produced the stage, chained through its inputs) says whether the stage
is done for the current config. A rerun skips every stage whose fingerprint matches.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from slmrl_ray.config import PipelineConfig, fingerprint, to_dict

STAGES = ("data", "sft", "reward", "ppo", "eval")


class Reporter(Protocol):
    """Receives a stage's metrics as it goes; `checkpoint` names a folder a run can resume from.

    Stages call it without knowing who listens: the command line ignores it, a Tune trial
    forwards it to `tune.report` (with the checkpoint, so a retried trial resumes there).
    """

    def __call__(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None: ...


def no_report(metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
    """The default reporter: stages run without Ray (Tune passes its own)."""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def for_config(cls, config: PipelineConfig) -> "RunPaths":
        return cls(Path(config.output_dir) / config.model / config.corpus)

    def stage(self, name: str) -> Path:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}")
        return self.root / name

    @property
    def data(self) -> Path:
        return self.stage("data")

    @property
    def sft(self) -> Path:
        return self.stage("sft")

    @property
    def reward(self) -> Path:
        return self.stage("reward")

    @property
    def ppo(self) -> Path:
        return self.stage("ppo")

    @property
    def eval(self) -> Path:
        return self.stage("eval")


@functools.lru_cache(maxsize=None)
def runtime(device: str) -> dict[str, Any]:
    """What besides the config decides a trained stage's numbers: this package's version, and the
    device kind and its bf16 support, which resolve every `precision: auto` (`slmrl_ray.device`)."""
    import torch

    from slmrl_ray.device import bf16_supported

    kind = torch.device(device).type if device != "auto" else (
        "cuda" if torch.cuda.is_available() else
        "mps" if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else "cpu")
    bf16 = kind == "cuda" and torch.cuda.is_available() and bf16_supported(torch.device("cuda"))
    return {"version": package_version(), "device": kind, "bf16": bf16}


def package_version() -> str:
    try:
        return importlib.metadata.version("slmrl-ray")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def stage_fingerprints(config: PipelineConfig) -> dict[str, str]:
    """Each stage's fingerprint covers its own config and, through the chain, its inputs'.

    The data stage also writes the evaluation prompts (`eval.num_prompts`, `prompt_chars`, `prompt_format`):
    they are in its own fingerprint, not in the chain the training stages inherit (which
    read only the training files), so new prompts rerun data and evaluation, nothing else.
    The package version and the resolved precision (`runtime`) enter at the first stage they change.
    """
    machine = runtime(config.device)
    training_data = fingerprint(config.corpus, config.corpus_config, config.data, machine["version"])
    prompts = {"num_prompts": config.eval.num_prompts, "prompt_chars": config.eval.prompt_chars,
               "prompt_format": config.eval.prompt_format}
    data = fingerprint(training_data, prompts)
    sft = fingerprint(training_data, config.model, config.model_config, config.lora, config.sft, config.seed, machine)
    # The reward stage also trains a `split` judge (from another model's base, when it says so);
    # other judges only concern evaluation.
    judge = []
    if config.judge.source == "split":
        base = config.judge_base_key()
        judge = [config.judge, *([config.models[base]] if base is not None else [])]
    reward = fingerprint(sft, config.reward, *judge)
    ppo = fingerprint(reward, config.ppo, config.rewards)
    return {"data": data, "sft": sft, "reward": reward, "ppo": ppo,
            "eval": fingerprint(ppo, config.eval, config.judge)}


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (a crash never leaves a truncated file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=True))
    os.replace(scratch, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def is_stage_done(paths: RunPaths, stage: str, config: PipelineConfig) -> bool:
    marker = paths.stage(stage) / "stage.json"
    if not marker.exists():
        return False
    return read_json(marker).get("fingerprint") == stage_fingerprints(config)[stage]


def mark_stage_done(
    paths: RunPaths, stage: str, config: PipelineConfig, metrics: dict[str, Any], wall_time_s: float
) -> None:
    folder = paths.stage(stage)
    write_json(folder / "config.json", to_dict(config))
    write_json(folder / "metrics.json", metrics)
    write_json(
        folder / "stage.json",
        {
            "stage": stage,
            "fingerprint": stage_fingerprints(config)[stage],
            "wall_time_s": round(wall_time_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
