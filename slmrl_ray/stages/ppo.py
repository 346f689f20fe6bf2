"""PPO stage: our own PPO (TRL removed its PPO trainer in 2026), with the study's stability fixes.

One step = collect a rollout (sample responses for a batch of training prompts, score
them with the reward model, per-token KL penalty against the frozen reference, GAE)
then `ppo_epochs` passes of clipped-surrogate + clipped-value updates over mini-batches.
The math lives in `slmrl_ray.rl_math`; this file only orchestrates.

The study's fixes (SPEC 1.3), all here:
  1. merge-and-reinitialise: a fresh LoRA on the merged SFT weights (`ppo_model`);
  2. float32 (`ppo.precision`, `device.ppo_dtype`); bf16 only when asked, and the final
     merge always in float32 (`ppo_model.merge_in_fp32`);
  3. running score normalisation clipped to +-`score_clip`, a mean-ratio threshold that
     skips a mini-batch, gradient clipping, and a non-finite guard that restores the
     last healthy snapshot of the *whole* training state and gives up after
     `max_rollbacks` (`ppo_state`).
Departure from the study: responses shorter than `ppo.min_response_tokens`, or empty once
decoded, get a fixed normalised score (`short_response_penalty`, kept out of the running
statistics), as lm-human-preferences and torchtune do. Without it a policy under a
per-token KL penalty collapses to short or empty answers whenever the reward is flat.
Randomness is seeded per step (prompt choice, sampling, mini-batch order), so a run
resumed from a checkpoint takes the same path as one that was never interrupted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import set_seed

from slmrl_ray.artifacts import Reporter, RunPaths, no_report, stage_fingerprints
from slmrl_ray.checks import assert_changed, assert_responses_nonempty, trainable_snapshot
from slmrl_ray.config import PipelineConfig, PPOConfig
from slmrl_ray.data import PreferencePair, load_jsonl, ppo_prompts
from slmrl_ray.device import ppo_dtype, resolve_device
from slmrl_ray.generation import SamplingSettings, decode_responses, generate
from slmrl_ray.models import count_parameters, load_causal_lm, load_reward_model, load_tokenizer, lora_config
from slmrl_ray.rewards import MixedReward, build_reward
from slmrl_ray.rl_math import (
    gae_advantages,
    is_finite,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    normalize_scores,
    penalize_short_responses,
    policy_loss,
    value_loss,
)
from slmrl_ray.stages.ppo_model import PolicyWithValueHead, RewardModelCritic, save_merged_policy
from slmrl_ray.stages.ppo_state import (
    KEEP_CHECKPOINTS,
    NonFiniteError,
    PPODivergedError,
    PPOState,
    append_log,
    checkpoints_dir,
    finish_metrics,
    initial_state,
    latest_checkpoint,
    load_checkpoint,
    log_path,
    prune_checkpoints,
    read_log,
    restore,
    save_checkpoint,
    snapshot,
)


class Rollout(NamedTuple):
    """One step's experience. Shapes: [B, P] query, [B, R] response-aligned, [B] scores."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@dataclass
class PPOComponents:
    model: PolicyWithValueHead
    tokenizer: object
    scorer: MixedReward
    optimizer: torch.optim.Optimizer
    prompts: list[str]
    device: torch.device


def build_components(config: PipelineConfig, paths: RunPaths) -> PPOComponents:
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(paths.sft / "model")
    base = load_causal_lm(paths.sft / "model", tokenizer, device=device)
    dtype = ppo_dtype(config.ppo.precision, count_parameters(base), device, config.ppo.fp32_below_params)
    base.to(dtype)
    # A fresh adapter (B = 0), without dropout so the importance ratios compare like with like.
    # Its A matrices and the value head start random: seeded, so a retry in a reused Ray
    # worker (whose random state has moved on) starts from the same weights as the first try.
    lora = lora_config(config.model_config.lora_r, config.lora.alpha_per_rank, 0.0, config.lora.target_modules,
                       "CAUSAL_LM")
    set_seed(config.seed)
    critic = None
    if config.ppo.value_init == "reward_model":  # the critic starts as the pipeline's reward model
        rm_tokenizer = load_tokenizer(paths.reward / "model")
        if rm_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError("ppo.value_init=reward_model needs the reward model to share the policy's tokenizer")
        reward_model = load_reward_model(paths.reward / "model", rm_tokenizer, dtype=dtype, device=device)
        critic = RewardModelCritic(reward_model, lora)
    model = PolicyWithValueHead(base, lora, critic).eval()
    scorer = build_reward(config.rewards, config.reward, paths.reward, device, dtype)
    optimizer = torch.optim.Adam(model.trainable_parameters().values(), lr=config.ppo.learning_rate)
    prompts = ppo_prompts(load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair))
    return PPOComponents(model, tokenizer, scorer, optimizer, prompts, device)


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def ended_with_eos(response_ids: torch.Tensor, response_mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B] bool: the response stopped at EOS (False: it ran into max_new_tokens)."""
    return ((response_ids == eos_token_id) & (response_mask != 0)).any(dim=1)


def short_responses(response_mask: torch.Tensor, ended: torch.Tensor, responses: list[str],
                    min_tokens: int) -> torch.Tensor:
    """[B] bool: fewer than `min_tokens` tokens before EOS, or nothing but whitespace once decoded."""
    tokens = response_mask.sum(dim=1) - ended.long()
    empty = torch.tensor([not text.strip() for text in responses], device=tokens.device)
    return (tokens < min_tokens) | empty


def shaped_scores(scores: torch.Tensor, short: torch.Tensor, unfinished: torch.Tensor, moments,
                  cfg: PPOConfig) -> torch.Tensor:
    """[B] scores as PPO uses them: running normalisation clipped to +-score_clip, minus
    `missing_eos_penalty` where the response never ended, then the fixed penalty for short
    responses. Short responses stay out of the running statistics, so a batch of collapsed
    answers cannot shift what "normal" means. Updates `moments`."""
    moments.update(scores[~short].cpu())
    normalized = normalize_scores(scores, moments, cfg.score_clip)
    normalized = normalized - cfg.missing_eos_penalty * unfinished.to(normalized.dtype)
    return penalize_short_responses(normalized, short, cfg.short_response_penalty)


def collect_rollout(
    parts: PPOComponents, cfg: PPOConfig, state: PPOState, seed: int
) -> tuple[Rollout, dict]:
    """Sample, score and compute advantages for one batch of prompts (no gradients)."""
    generator = torch.Generator().manual_seed(step_seed(seed, state.step))
    picks = torch.randperm(len(parts.prompts), generator=generator)[: cfg.rollout_batch_size]
    prompts = [parts.prompts[i] for i in picks.tolist()]
    torch.manual_seed(step_seed(seed, state.step))
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
    started = time.perf_counter()
    with torch.no_grad():
        gen = generate(parts.model.policy, parts.tokenizer, prompts, settings, cfg.max_prompt_length, parts.device)
        responses = decode_responses(parts.tokenizer, gen)
        empty_fraction = assert_responses_nonempty(responses, cfg.max_empty_fraction)
        ended = ended_with_eos(gen.response_ids, gen.response_mask, parts.tokenizer.eos_token_id)
        short = short_responses(gen.response_mask, ended, responses, cfg.min_response_tokens)
        generated = time.perf_counter()
        components = parts.scorer.components(prompts, responses)
        scores = parts.scorer.total(components).to(parts.device)
        scored = time.perf_counter()
        outputs = parts.model.response_outputs(*gen, temperature=cfg.temperature)
        with parts.model.reference():
            ref = parts.model.response_outputs(*gen, temperature=cfg.temperature, with_values=False)
        if not is_finite(scores, outputs.logprobs, ref.logprobs, outputs.values):
            raise NonFiniteError("non-finite scores, log-probabilities or values in the rollout")
        mask = gen.response_mask
        normalized = shaped_scores(scores, short, ~ended, state.moments, cfg)
        rewards, kl = kl_penalty_rewards(
            normalized, outputs.logprobs, ref.logprobs, mask, state.kl_controller.value
        )
        advantages, returns = gae_advantages(rewards, outputs.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    rollout = Rollout(*gen, outputs.logprobs, outputs.values, advantages, returns)
    stats = {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std(unbiased=False)),
        "score_normalized_mean": float(normalized.mean()),
        "kl": float((kl * mask).sum(dim=1).mean()),  # per-sequence KL, averaged over the batch
        "kl_coef": float(state.kl_controller.value),
        "entropy": float(masked_mean(outputs.entropy, mask)),
        "response_length": float(mask.sum(dim=1).float().mean()),
        "empty_fraction": empty_fraction,
        "short_fraction": float(short.float().mean()),
        "unfinished_fraction": float((~ended).float().mean()),
        "score_std_running": state.moments.std,
        **{f"reward/{name}": float(values.mean()) for name, values in components.items()},
        "time_generate_s": generated - started,
        "time_score_s": scored - generated,
    }
    return rollout, stats


def update_policy(parts: PPOComponents, rollout: Rollout, cfg: PPOConfig, seed: int, step: int) -> dict:
    """`ppo_epochs` passes over shuffled mini-batches; returns averaged statistics."""
    model, optimizer = parts.model, parts.optimizer
    params = list(model.trainable_parameters().values())
    generator = torch.Generator().manual_seed(step_seed(seed, step) + 1)
    batch = rollout.response_ids.shape[0]
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0,
              "value_clip_fraction": 0.0, "approx_kl": 0.0, "grad_norm": 0.0}
    updates = skipped = 0
    for _ in range(cfg.ppo_epochs):
        for rows in torch.randperm(batch, generator=generator).split(cfg.mini_batch_size):
            rows = rows.to(rollout.response_ids.device)
            mb = Rollout(*(t[rows] for t in rollout))
            out = model.response_outputs(
                mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask, temperature=cfg.temperature
            )
            pg = policy_loss(out.logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.clip_range)
            if float(pg.ratio_mean) > cfg.ratio_threshold:  # the study's ratio threshold
                skipped += 1
                continue
            vf = value_loss(out.values, mb.values, mb.returns, mb.response_mask, cfg.clip_range_value)
            loss = pg.loss + cfg.vf_coef * vf.loss
            if not is_finite(loss):
                raise NonFiniteError(f"non-finite loss at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not is_finite(grad_norm):
                raise NonFiniteError(f"non-finite gradient norm at step {step}")
            optimizer.step()
            updates += 1
            for key, value in (("policy_loss", pg.loss), ("value_loss", vf.loss),
                               ("clip_fraction", pg.clip_fraction), ("ratio_mean", pg.ratio_mean),
                               ("value_clip_fraction", vf.clip_fraction), ("approx_kl", pg.approx_kl),
                               ("grad_norm", grad_norm)):
                totals[key] += float(value.detach())
    if not is_finite(*params):
        raise NonFiniteError(f"non-finite weights after step {step}")
    stats = {key: value / max(updates, 1) for key, value in totals.items()}
    return {**stats, "updates": updates, "skipped_minibatches": skipped}


def ppo_step(parts: PPOComponents, cfg: PPOConfig, state: PPOState, seed: int) -> dict:
    rollout, stats = collect_rollout(parts, cfg, state, seed)
    started = time.perf_counter()
    stats.update(update_policy(parts, rollout, cfg, seed, state.step))
    stats["time_update_s"] = time.perf_counter() - started
    state.kl_controller.update(stats["kl"], cfg.rollout_batch_size)
    return stats


def run_ppo(config: PipelineConfig, paths: RunPaths, report: Reporter = no_report) -> dict:
    """Our PPO; `stages.rl.run_rl` is the stage's entry, which sends GRPO/RLOO to `trl_rl`."""
    if config.ppo.algorithm != "ppo":
        raise ValueError(f"run_ppo runs ppo.algorithm=ppo, not {config.ppo.algorithm!r} (use stages.rl.run_rl)")
    cfg = config.ppo
    parts = build_components(config, paths)
    state = initial_state(cfg)
    initial = trainable_snapshot(parts.model)
    fingerprint = stage_fingerprints(config)["ppo"]
    checkpoints, log_file = checkpoints_dir(paths.ppo), log_path(paths.ppo)
    resume = latest_checkpoint(checkpoints, fingerprint)
    resumed_from = 0
    if resume is not None:
        load_checkpoint(resume, parts.model, parts.optimizer, state)
        resumed_from = state.step
    history = read_log(log_file, upto=resumed_from)
    healthy = snapshot(parts.model, parts.optimizer, state)
    progress = tqdm(total=cfg.steps, initial=state.step, desc="ppo", unit="step")
    while state.step < cfg.steps:
        try:
            stats = ppo_step(parts, cfg, state, config.seed)
            healthy = snapshot(parts.model, parts.optimizer, state)
        except NonFiniteError as error:
            restore(parts.model, parts.optimizer, state, healthy)
            state.rollbacks += 1
            stats = {"rolled_back": str(error)}
            if state.rollbacks > cfg.max_rollbacks:
                raise PPODivergedError(
                    f"{state.rollbacks} non-finite steps (limit ppo.max_rollbacks={cfg.max_rollbacks}); "
                    f"last: {error}"
                ) from error
        state.step += 1
        record = {"step": state.step, "rollbacks": state.rollbacks, **stats}
        history.append(record)
        append_log(log_file, record)
        progress.update(1)
        progress.set_postfix(reward=stats.get("reward_mean"), kl=stats.get("kl"))
        checkpoint = None
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            checkpoint = save_checkpoint(checkpoints, parts.model, parts.optimizer, state, fingerprint)
            prune_checkpoints(checkpoints, keep=KEEP_CHECKPOINTS)
        report({f"ppo/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, checkpoint)
    progress.close()
    return _finish(config, paths, parts, state, initial, history, resumed_from)


def _finish(config, paths, parts, state, initial, history, resumed_from) -> dict:
    largest_change = assert_changed(initial, parts.model, "PPO")
    dtype = str(next(parts.model.parameters()).dtype).replace("torch.", "")
    value_state = parts.model.value_state()
    save_merged_policy(parts.model.policy, parts.tokenizer, paths.ppo / "model", "PPO policy")
    value_file = "value_head.safetensors" if parts.model.critic is None else "critic.safetensors"
    save_file(value_state, paths.ppo / value_file)
    return finish_metrics(state.step, state.rollbacks, resumed_from, history, float(state.kl_controller.value),
                          largest_change, dtype)  # dtype: the training dtype; the saved policy is float32
