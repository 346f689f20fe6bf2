"""Reward-model stage: Bradley-Terry training with TRL's `RewardTrainer`, then merge and save.

The reward model starts from the merged SFT model (the original code meant to but
started from the base model; SPEC 1.5): a sequence classifier with one scalar output,
a LoRA on the backbone plus a fully trained score head, loss -log sigmoid(r_chosen -
r_rejected). The training set is pre-tokenized with `scoring.encode_reward_text`, the
same function every scorer uses, so the text the model learns on and the text it
scores later are identical (separator and EOS included). Held-out pairwise accuracy is
measured with the saved, merged model through `RewardScorer`: the path PPO and
evaluation use.

With `judge.source: split` the stage trains a second reward model, the judge, on a disjoint
share of the training prompts (no prompt on both sides) and saves it to `reward/judge/`;
evaluation scores with it, PPO never sees it. Independent where it matters when configured
so (`judge.base_model`, `judge.pairs`): another architecture's pretrained base with its own
LoRA rank, pairs built by another recipe, and another initialisation seed (always).
"""

from __future__ import annotations

import random

from datasets import Dataset
from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from slmrl_ray.artifacts import Reporter, RunPaths, no_report
from slmrl_ray.checks import assert_changed, assert_finite_state, trainable_snapshot
from slmrl_ray.config import PipelineConfig
from slmrl_ray.data import (
    Document,
    PreferencePair,
    build_judge_pairs,
    degenerate_pairs,
    document_prompt,
    load_jsonl,
)
from slmrl_ray.device import resolve_device
from slmrl_ray.models import (
    base_model_path,
    load_reward_model,
    load_tokenizer,
    lora_config,
)
from slmrl_ray.rewards import JUDGE_FOLDER, pipeline_scorer
from slmrl_ray.scoring import encode_reward_text, pairwise_accuracy
from slmrl_ray.stages.sft import trainer_arguments


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


def judge_split(pairs: list[PreferencePair], fraction: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(reward-model pairs, judge pairs): disjoint, no prompt on both sides."""
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    judged = {prompts[i] for i in order[: max(1, round(len(prompts) * fraction))]}
    return [p for p in pairs if p.prompt not in judged], [p for p in pairs if p.prompt in judged]


def training_pairs(config: PipelineConfig, paths: RunPaths) -> dict[str, list[PreferencePair]]:
    """The pairs each model of this stage trains on: `model`, and `judge` with a split judge.

    The judge's prompts are its share of the training prompts; with `judge.pairs: other` its
    pairs are rebuilt from those prompts' training documents by `build_judge_pairs` (plus
    degenerate ones, on another seed) instead of the reward model's recipe; `both` keeps the
    study pairs of its prompts and adds those.
    """
    pairs = load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair)
    if config.judge.source != "split":
        return {"model": pairs}
    reward_pairs, judge_pairs = judge_split(pairs, config.judge.fraction, config.seed + 1)
    if config.judge.pairs != "study":
        corpus = config.corpus_config.kind
        prompts = {pair.prompt for pair in judge_pairs}
        docs = [doc for doc in load_jsonl(paths.data / "train.jsonl", Document)
                if document_prompt(corpus, doc) in prompts]
        other = build_judge_pairs(corpus, docs, config.data.seed + 2)
        other += degenerate_pairs(other, config.data.degenerate_pairs, config.data.seed + 2)
        judge_pairs = other if config.judge.pairs == "other" else judge_pairs + other
    return {"model": reward_pairs, JUDGE_FOLDER: judge_pairs}


def build_reward_trainer(
    config: PipelineConfig, paths: RunPaths, pairs: list[PreferencePair], name: str = "model"
) -> RewardTrainer:
    """A reward model from the merged SFT model; a split judge from the same, or from another
    model's pretrained base (`judge.base_model`), initialised from another seed."""
    device = resolve_device(config.device)
    cfg = config.reward
    start, lora_r, seed = paths.sft / "model", config.model_config.lora_r, config.seed
    if name == JUDGE_FOLDER:
        base = config.judge_base_key()
        if base is not None:
            start, lora_r = base_model_path(config.models[base], config.cache_dir), config.models[base].lora_r
        seed = config.seed + 1
    tokenizer = load_tokenizer(start)
    # The score head (here) and the LoRA (in the trainer) start random: seed them, or a retried
    # trial in a reused Ray worker, whose random state has moved on, trains a different model.
    set_seed(seed)
    model = load_reward_model(start, tokenizer, device=device)
    args = RewardConfig(**trainer_arguments(cfg, paths.reward / f"trainer_{name}", device, seed))
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=preference_dataset(pairs, tokenizer, cfg.max_length),
        processing_class=tokenizer,
        peft_config=lora_config(lora_r, config.lora.alpha_per_rank, config.lora.dropout,
                                config.lora.target_modules, "SEQ_CLS"),
    )


def train_one(config: PipelineConfig, paths: RunPaths, pairs: list[PreferencePair], name: str) -> dict:
    """Train, merge and save one reward model to `reward/<name>`; returns its training metrics."""
    trainer = build_reward_trainer(config, paths, pairs, name)
    before = trainable_snapshot(trainer.model)
    result = trainer.train()
    largest_change = assert_changed(before, trainer.model, f"reward model ({name})")
    merged = trainer.model.merge_and_unload()
    assert_finite_state(merged.state_dict(), f"reward model ({name})")
    merged.save_pretrained(paths.reward / name, safe_serialization=True)
    trainer.processing_class.save_pretrained(paths.reward / name)
    return {
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "train_runtime_s": float(result.metrics["train_runtime"]),  # the optimisation loop alone
        "lora_max_change": largest_change,
        "train_pairs": len(pairs),
    }


def run_reward(config: PipelineConfig, paths: RunPaths, report: Reporter = no_report) -> dict:
    device = resolve_device(config.device)
    heldout = load_jsonl(paths.data / "pairs_heldout.jsonl", PreferencePair)
    metrics: dict = {}
    for name, pairs in training_pairs(config, paths).items():
        trained = train_one(config, paths, pairs, name)
        # Accuracy from the saved artifact, through the scorer PPO and evaluation use.
        scored = {**trained, **pairwise_accuracy(pipeline_scorer(paths.reward / name, config, device), heldout)}
        metrics.update(scored if name == "model" else {f"judge_{k}": v for k, v in scored.items()})
    report({f"reward/{k}": v for k, v in metrics.items()})
    return metrics
