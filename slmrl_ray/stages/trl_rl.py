"""GRPO and RLOO through TRL's trainers: the `ppo` stage with `ppo.algorithm: grpo | rloo`.

Same inputs and outputs as our PPO (`stages/ppo.py`), so evaluation, Tune, Serve and the
report work unchanged: the policy is a fresh LoRA (B = 0, no dropout) on the merged SFT
model saved at `sft/model` (so the reference is the adapter-disabled model and nothing is
re-loaded from a path that differs from the policy); prompts are `data.ppo_prompts`; the
reward is `rewards.build_reward`, called on the decoded completion text, so the reward
model sees exactly the format (and EOS) it was trained on; the stage writes `ppo/model`
(merged, safetensors), `ppo/log.jsonl` (one record per step, PPO's keys) and checkpoints
in `ppo/checkpoints/step-NNNNNN` (TRL's checkpoint folder plus our `state.json`, which is
written by `ppo_state.adopt_checkpoint`), reported as our PPO reports them.

How `ppo:` maps onto GRPOConfig / RLOOConfig. A "step" stays one rollout as in our PPO;
TRL counts optimiser updates, so with U = ppo_epochs x rollout_batch_size / mini_batch_size:
  rollout_batch_size -> generation_batch_size (rollout_batch_size / num_generations prompts,
                        num_generations responses each; our PPO samples one per prompt)
  mini_batch_size    -> per_device_train_batch_size, gradient_accumulation_steps = 1, so
                        steps_per_generation = rollout_batch_size / mini_batch_size
  ppo_epochs         -> num_iterations: U optimiser updates per rollout, as in our PPO
  steps              -> max_steps = steps x U;  checkpoint_every -> save_steps = every x U;
                        logging_steps = U (one log, hence one record, per rollout)
  init_kl_coef -> beta;  clip_range -> epsilon;  max_new_tokens -> max_completion_length;
  learning_rate (constant schedule, Adam(W) without weight decay, as ours), max_grad_norm,
  temperature / top_p / top_k, seed; bf16 only when `device.ppo_dtype` says bf16.
  max_prompt_length: TRL 1.16 dropped it, so prompts are left-truncated here with the
  policy tokenizer (as `generation.encode_prompts` does); the reward still sees the whole
  prompt, as in our PPO.

Where it departs from our PPO, and why (TRL's algorithms, taken as they are):
  * No critic and no GAE: GRPO's advantage is the reward minus its group mean over the
    group's std (`scale_rewards="group"`); RLOO's is the reward minus the mean of the
    other responses of its prompt (whitened over the batch when `whiten_advantages`).
  * KL: a fixed beta (TRL has no adaptive controller; `kl_target` applies to ppo only).
    GRPO adds beta x k3-KL per token to the loss; RLOO subtracts beta x the summed
    log-ratio from the reward. `kl` in the log is per sequence, like ours: TRL's per-token
    mean (kept as `kl_per_token`) times the mean response length (exact for RLOO, whose KL
    is measured on the rollout; GRPO's is averaged over its updates). With beta = 0 TRL
    computes no KL and `kl` is NaN.
  * GRPO uses loss_type "bnpo" (token mean over the mini-batch, which is our PPO's loss);
    RLOO's ratio and clipping are per sequence. Mini-batches are shuffled once per rollout.
  * No running score normalisation/clip, ratio threshold or rollback: a non-finite reward,
    loss or gradient ends the stage with `PPODivergedError` (Tune scores it as diverged);
    `rollbacks` is always 0. The empty-response guard (`max_empty_fraction`) is kept.
  * TRL tokenizes prompts with the tokenizer's special tokens: where a tokenizer adds a
    BOS, its prompts carry one and ours do not (the tiny tokenizers add none).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from slmrl_ray.artifacts import Reporter, RunPaths, no_report, stage_fingerprints
from slmrl_ray.checks import assert_changed, assert_responses_nonempty, trainable_snapshot
from slmrl_ray.config import PipelineConfig, PPOConfig
from slmrl_ray.data import PreferencePair, load_jsonl, ppo_prompts
from slmrl_ray.device import ppo_dtype, resolve_device
from slmrl_ray.models import count_parameters, load_causal_lm, load_tokenizer, lora_config
from slmrl_ray.rewards import MixedReward, build_reward
from slmrl_ray.stages.ppo_model import save_merged_policy
from slmrl_ray.stages.ppo_state import (
    PPODivergedError,
    adopt_checkpoint,
    append_log,
    checkpoint_step,
    checkpoints_dir,
    finish_metrics,
    latest_checkpoint,
    log_path,
    read_log,
)

TRAINERS = {"grpo": GRPOTrainer, "rloo": RLOOTrainer}


def updates_per_rollout(cfg: PPOConfig) -> int:
    """Optimiser updates per rollout, as in our PPO: ppo_epochs x rollout / mini-batch."""
    return cfg.ppo_epochs * cfg.rollout_batch_size // cfg.mini_batch_size


def trl_arguments(config: PipelineConfig, output_dir: Path, device: torch.device,
                  dtype: torch.dtype) -> GRPOConfig | RLOOConfig:
    """The TRL config for `ppo.algorithm` (the mapping is in the module docstring)."""
    cfg = config.ppo
    updates = updates_per_rollout(cfg)
    common = dict(
        output_dir=str(output_dir), max_steps=cfg.steps * updates, logging_steps=updates,
        save_strategy="steps", save_steps=cfg.checkpoint_every * updates,
        per_device_train_batch_size=cfg.mini_batch_size, gradient_accumulation_steps=1,
        generation_batch_size=cfg.rollout_batch_size, num_generations=cfg.num_generations,
        num_iterations=cfg.ppo_epochs, learning_rate=cfg.learning_rate, lr_scheduler_type="constant",
        max_grad_norm=cfg.max_grad_norm, beta=cfg.init_kl_coef, epsilon=cfg.clip_range,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, disable_dropout=True, activation_checkpointing=False,
        bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu", seed=config.seed,
        report_to="none", disable_tqdm=True,  # our progress bar, as PPO's, instead of a dict per log
    )
    if cfg.algorithm == "grpo":
        return GRPOConfig(**common, loss_type="bnpo")
    return RLOOConfig(**common, normalize_advantages=cfg.whiten_advantages)


def prompt_dataset(prompts: Sequence[str], tokenizer, max_prompt_length: int) -> Dataset:
    """A "prompt" column left-truncated to `max_prompt_length` tokens; "scored_prompt" keeps the whole one."""
    truncated = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        truncated.append(prompt if len(ids) <= max_prompt_length else tokenizer.decode(ids[-max_prompt_length:]))
    return Dataset.from_dict({"prompt": truncated, "scored_prompt": list(prompts)})


class TRLReward:
    """Our reward source as a TRL reward function: `f(prompts, completions, **kwargs) -> list[float]`.

    TRL passes the decoded completions (special tokens skipped, like `decode_responses`)
    and the dataset's other columns; we score the whole prompt (`scored_prompt`) and keep
    the batch's statistics for the step record.
    """

    __name__ = "reward"  # TRL names its metrics after the function: rewards/reward/mean

    def __init__(self, scorer: MixedReward, max_empty_fraction: float) -> None:
        self.scorer = scorer
        self.max_empty_fraction = max_empty_fraction
        self.stats: dict = {}

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 scored_prompt: list[str], **kwargs) -> list[float]:
        started = time.perf_counter()
        empty_fraction = assert_responses_nonempty(completions, self.max_empty_fraction)
        components = self.scorer.components(scored_prompt, completions)
        scores = self.scorer.total(components)
        if not torch.isfinite(scores).all():
            raise PPODivergedError("non-finite rewards (grpo/rloo have no rollback)")
        self.stats = {
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std(unbiased=False)),
            "empty_fraction": empty_fraction,
            **{f"reward/{name}": float(values.mean()) for name, values in components.items()},
            "started": started,
            "time_score_s": time.perf_counter() - started,
        }
        return scores.tolist()


class StepRecorder(TrainerCallback):
    """TRL's per-rollout logs -> our log.jsonl records and `report` calls; each TRL checkpoint
    is moved to `checkpoints/step-NNNNNN` (with our state.json) and reported with its metrics."""

    def __init__(self, cfg: PPOConfig, reward: TRLReward, paths: RunPaths, fingerprint: str,
                 report: Reporter, history: list[dict], start_step: int) -> None:
        self.cfg, self.reward, self.paths, self.fingerprint = cfg, reward, paths, fingerprint
        self.report, self.history = report, history
        self.updates = updates_per_rollout(cfg)
        self.started = time.perf_counter()
        self.pending: dict | None = None
        self.progress = tqdm(total=cfg.steps, initial=start_step, desc=cfg.algorithm, unit="step")

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.updates == 0:  # the rollout's first update: TRL generates now
            self.started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "reward" not in (logs or {}):  # the end-of-training summary
            return
        now = time.perf_counter()
        stats = dict(self.reward.stats)
        score_started = stats.pop("started", self.started)
        length = logs["completions/mean_length"]
        kl_per_token = logs.get("kl")
        record = {
            "step": state.global_step // self.updates, "rollbacks": 0, **stats,
            "kl": kl_per_token * length if kl_per_token is not None else math.nan,
            "kl_per_token": kl_per_token if kl_per_token is not None else math.nan,
            "kl_coef": self.cfg.init_kl_coef, "entropy": logs["entropy"], "response_length": length,
            "policy_loss": logs["loss"], "grad_norm": logs["grad_norm"],
            "clip_fraction": logs.get("clip_ratio/region_mean", math.nan), "updates": self.updates,
            # generation here includes TRL's old/reference log-prob passes, which precede scoring
            "time_generate_s": score_started - self.started,
            "time_update_s": now - score_started - stats.get("time_score_s", 0.0),
            "time_step_s": now - self.started,
        }
        if not all(math.isfinite(record[k]) for k in ("policy_loss", "grad_norm", "entropy")):
            raise PPODivergedError(f"non-finite loss or gradient at step {record['step']} (no rollback in TRL)")
        self.history.append(record)
        append_log(log_path(self.paths.ppo), record)
        self.progress.update(1)
        self.progress.set_postfix(reward=record["reward_mean"], kl=record["kl"])
        if control.should_save:  # report once, with the checkpoint, from on_save
            self.pending = record
        else:
            self.report(_metrics(record))

    def on_save(self, args, state, control, **kwargs):
        record, self.pending = self.pending, None
        step = state.global_step // self.updates
        source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        meta = {"fingerprint": self.fingerprint, "step": step, "rollbacks": 0,
                "algorithm": self.cfg.algorithm, "trainer_step": state.global_step}
        target = adopt_checkpoint(source, self.paths.ppo, meta)
        self.report(_metrics(record) if record else {"ppo/step": step}, target)

    def close(self) -> None:
        self.progress.close()


def run_trl_rl(config: PipelineConfig, paths: RunPaths, report: Reporter = no_report) -> dict:
    cfg = config.ppo
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(paths.sft / "model")
    model = load_causal_lm(paths.sft / "model", tokenizer, device=device)
    dtype = ppo_dtype(cfg.precision, count_parameters(model), device, cfg.fp32_below_params)
    model.to(dtype)
    reward = TRLReward(build_reward(config.rewards, config.reward, paths.reward, device, dtype), cfg.max_empty_fraction)
    prompts = ppo_prompts(load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair))
    set_seed(config.seed)  # the fresh LoRA's init, whatever this process ran before
    fingerprint = stage_fingerprints(config)["ppo"]
    resume = latest_checkpoint(checkpoints_dir(paths.ppo), fingerprint)
    resumed_from = checkpoint_step(resume) if resume is not None else 0
    history = read_log(log_path(paths.ppo), upto=resumed_from)
    trainer = TRAINERS[cfg.algorithm](
        model=model,
        reward_funcs=reward,
        args=trl_arguments(config, paths.ppo / "trainer", device, dtype),
        train_dataset=prompt_dataset(prompts, tokenizer, cfg.max_prompt_length),
        processing_class=tokenizer,
        peft_config=lora_config(config.model_config.lora_r, config.lora.alpha_per_rank, 0.0,
                                config.lora.target_modules, "CAUSAL_LM"),
    )
    trainer.remove_callback(PrinterCallback)
    recorder = StepRecorder(cfg, reward, paths, fingerprint, report, history, resumed_from)
    trainer.add_callback(recorder)
    initial = trainable_snapshot(trainer.model)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    finally:
        recorder.close()
    return _finish(config, paths, trainer, tokenizer, initial, history, resumed_from,
                   result.metrics["train_runtime"])


def _finish(config, paths, trainer, tokenizer, initial, history, resumed_from, runtime) -> dict:
    """Merge and save like our PPO's `_finish`; the same metrics, plus the algorithm and runtime."""
    cfg = config.ppo
    largest_change = assert_changed(initial, trainer.model, cfg.algorithm.upper())
    dtype = str(next(trainer.model.parameters()).dtype).replace("torch.", "")
    save_merged_policy(trainer.model, tokenizer, paths.ppo / "model", f"{cfg.algorithm.upper()} policy")
    shutil.rmtree(paths.ppo / "trainer", ignore_errors=True)  # its checkpoints were moved out
    steps = trainer.state.global_step // updates_per_rollout(cfg)
    return {
        "algorithm": cfg.algorithm,
        **finish_metrics(steps, 0, resumed_from, history, cfg.init_kl_coef, largest_change, dtype),
        "train_runtime_s": float(runtime),  # this attempt's optimisation loop
    }


def _metrics(record: dict) -> dict:
    return {f"ppo/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
