"""Reward-model stage: Bradley-Terry training with TRL's `RewardTrainer`, then merge and save.

The reward model starts from the merged SFT model (the original code meant to but
started from the base model; SPEC 1.5): a sequence classifier with one scalar output,
a LoRA on the backbone plus a fully trained score head, loss -log sigmoid(r_chosen -
r_rejected). The training set is pre-tokenized with `scoring.encode_reward_text`, the
same function every scorer uses, so the text the model learns on and the text it
scores later are identical (separator and EOS included). Held-out pairwise accuracy is
measured with the saved, merged model through `RewardScorer`: the path PPO and
evaluation use.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from trl import RewardConfig as TRLRewardConfig
from trl import RewardTrainer

from slmrl_ray.artifacts import Reporter, RunPaths, no_report
from slmrl_ray.checks import assert_changed, assert_finite_state, trainable_snapshot
from slmrl_ray.config import PipelineConfig
from slmrl_ray.data import PreferencePair, load_jsonl
from slmrl_ray.device import resolve_device
from slmrl_ray.models import load_reward_model, load_tokenizer
from slmrl_ray.scoring import RewardScorer, encode_reward_text
from slmrl_ray.stages.sft import lora_config, trainer_arguments


def preference_dataset(pairs: list[PreferencePair], tokenizer, max_length: int) -> Dataset:
    """Pre-tokenized `chosen_ids` / `rejected_ids` (TRL's processed-dataset format)."""
    return Dataset.from_dict(
        {
            "chosen_ids": [encode_reward_text(tokenizer, p.prompt, p.chosen, max_length) for p in pairs],
            "rejected_ids": [
                encode_reward_text(tokenizer, p.prompt, p.rejected, max_length) for p in pairs
            ],
        }
    )


def build_reward_trainer(config: PipelineConfig, paths: RunPaths) -> RewardTrainer:
    device = resolve_device(config.device)
    cfg = config.reward
    tokenizer = load_tokenizer(paths.sft / "model")
    model = load_reward_model(paths.sft / "model", tokenizer, device=device)
    pairs = load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair)
    args = TRLRewardConfig(**trainer_arguments(cfg, paths.reward / "trainer", device, config.seed))
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=preference_dataset(pairs, tokenizer, cfg.max_length),
        processing_class=tokenizer,
        peft_config=lora_config(config, "SEQ_CLS"),
    )


def pairwise_accuracy(scorer: RewardScorer, pairs: list[PreferencePair]) -> dict:
    prompts = [p.prompt for p in pairs]
    chosen = scorer.score(prompts, [p.chosen for p in pairs])
    rejected = scorer.score(prompts, [p.rejected for p in pairs])
    margin = chosen - rejected
    return {
        "heldout_accuracy": float((margin > 0).float().mean()),
        "heldout_margin": float(margin.mean()),
        "heldout_pairs": len(pairs),
    }


def run_reward(config: PipelineConfig, paths: RunPaths, report: Reporter = no_report) -> dict:
    trainer = build_reward_trainer(config, paths)
    before = trainable_snapshot(trainer.model)
    result = trainer.train()
    largest_change = assert_changed(before, trainer.model, "reward model")
    merged = trainer.model.merge_and_unload()
    assert_finite_state(merged.state_dict(), "reward model")
    merged.save_pretrained(paths.reward / "model", safe_serialization=True)
    trainer.processing_class.save_pretrained(paths.reward / "model")

    # Accuracy from the saved artifact, through the scorer PPO and evaluation use.
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(paths.reward / "model")
    model = load_reward_model(paths.reward / "model", tokenizer, device=device)
    scorer = RewardScorer(model, tokenizer, config.reward.max_length, config.reward.score_batch_size, device)
    heldout = load_jsonl(paths.data / "pairs_heldout.jsonl", PreferencePair)
    metrics = {
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "train_runtime_s": float(result.metrics["train_runtime"]),  # the optimisation loop alone
        "lora_max_change": largest_change,
        **pairwise_accuracy(scorer, heldout),
    }
    report({f"reward/{k}": v for k, v in metrics.items()})
    return metrics
