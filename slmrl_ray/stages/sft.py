"""SFT stage: LoRA fine-tuning with TRL's `SFTTrainer`, then merge and save.

Plain causal-LM training on the corpus texts in packed blocks (the study's recipe,
SPEC 1.2), with the pad token distinct from EOS so EOS stays in the loss and the model
learns to stop. The LoRA is merged into the base weights and the merged model saved as
safetensors: the reward model and PPO start from it.
"""

from __future__ import annotations

import math
from pathlib import Path

from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from slmrl_ray.artifacts import Reporter, RunPaths, no_report
from slmrl_ray.checks import assert_changed, assert_finite_state, trainable_snapshot
from slmrl_ray.config import PipelineConfig, RewardModelConfig
from slmrl_ray.config import SFTConfig as SFTStageConfig
from slmrl_ray.data import Document, load_jsonl, sft_text
from slmrl_ray.device import resolve_device, training_precision
from slmrl_ray.models import base_model_path, count_parameters, load_causal_lm, load_tokenizer, lora_config


def trainer_arguments(cfg: SFTStageConfig | RewardModelConfig, output_dir: Path, device, seed: int) -> dict:
    """The TRL/transformers arguments the SFT and reward stages share."""
    precision = training_precision(cfg.precision, device)
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        max_length=cfg.max_length,
        bf16=precision == "bf16",
        use_cpu=device.type == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        save_strategy="no",
        report_to="none",
        # A progress bar per stage: transformers hides it when its logger is quieter than
        # WARN, which `slmrl-ray run` sets to keep load reports out of the output.
        disable_tqdm=False,
        logging_steps=max(1, cfg.max_steps // 10) if cfg.max_steps > 0 else 10,
        seed=seed,
    )


def sft_datasets(config: PipelineConfig, paths: RunPaths) -> tuple[Dataset, Dataset]:
    kind = config.corpus_config.kind
    train = load_jsonl(paths.data / "train.jsonl", Document)
    heldout = load_jsonl(paths.data / "heldout.jsonl", Document)
    return (
        Dataset.from_dict({"text": [sft_text(kind, d) for d in train]}),
        Dataset.from_dict({"text": [sft_text(kind, d) for d in heldout]}),
    )


def build_sft_trainer(config: PipelineConfig, paths: RunPaths) -> SFTTrainer:
    """The configured trainer, before training (tests inspect its data and collator)."""
    device = resolve_device(config.device)
    cfg = config.sft
    base = base_model_path(config.model_config, config.cache_dir)
    tokenizer = load_tokenizer(base, config.model_config.revision)
    set_seed(config.seed)  # the LoRA's random init, whatever this process ran before
    model = load_causal_lm(base, tokenizer, device=device, revision=config.model_config.revision)
    train, heldout = sft_datasets(config, paths)
    args = SFTConfig(
        **trainer_arguments(cfg, paths.sft / "trainer", device, config.seed),
        per_device_eval_batch_size=cfg.batch_size,
        neftune_noise_alpha=cfg.neftune_alpha,
        packing=True,
        packing_strategy="wrapped",  # the study's packed blocks, no padding
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,
        peft_config=lora_config(config.model_config.lora_r, config.lora.alpha_per_rank, config.lora.dropout,
                                config.lora.target_modules, "CAUSAL_LM"),
    )


def run_sft(config: PipelineConfig, paths: RunPaths, report: Reporter = no_report) -> dict:
    trainer = build_sft_trainer(config, paths)
    before = trainable_snapshot(trainer.model)
    result = trainer.train()
    largest_change = assert_changed(before, trainer.model, "SFT")
    eval_loss = trainer.evaluate()["eval_loss"]
    merged = trainer.model.merge_and_unload()
    assert_finite_state(merged.state_dict(), "SFT merged model")
    merged.save_pretrained(paths.sft / "model", safe_serialization=True)
    trainer.processing_class.save_pretrained(paths.sft / "model")
    metrics = {
        "train_loss": float(result.training_loss),
        "heldout_loss": float(eval_loss),
        "heldout_perplexity": math.exp(eval_loss),
        "steps": int(result.global_step),
        "train_runtime_s": float(result.metrics["train_runtime"]),  # the optimisation loop alone
        "parameters": count_parameters(merged),
        "lora_max_change": largest_change,
    }
    report({f"sft/{k}": v for k, v in metrics.items()})
    return metrics
