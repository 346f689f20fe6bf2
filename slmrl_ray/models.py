"""Load base models, tokenizers and reward models through the real `from_pretrained` path.

A model is a hub id or a local folder (a hub snapshot, or a folder this project wrote:
the tiny preset and the GGUF conversion save their models and tokenizers the same way
and load them back through these functions). Loading is safe by default: `trust_remote_code=False` and
safetensors only.

The tokenizer always has a pad token distinct from EOS (SPEC 1.5: with pad == EOS the
original code masked EOS out of the SFT loss, so models never learned to stop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from slmrl_ray.config import ModelConfig
from slmrl_ray.gguf_source import gguf_path, gguf_snapshot_dir

PAD_TOKEN = "<|pad|>"


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token distinct from EOS, adding one if needed."""
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def load_tokenizer(name_or_path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        str(name_or_path), revision=revision, trust_remote_code=False
    )
    return ensure_pad_token(tokenizer)


def align_with_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings if the tokenizer gained tokens, and record pad/EOS on the model."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(
    name_or_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_path),
        revision=revision,
        dtype=dtype,
        trust_remote_code=False,
        use_safetensors=True,
    )
    align_with_tokenizer(model, tokenizer)
    return model.to(device)


def load_reward_model(
    name_or_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
) -> PreTrainedModel:
    """A sequence classifier with one scalar output (a fresh score head if the folder has none)."""
    model = _sequence_classifier(name_or_path, dtype, revision)
    align_with_tokenizer(model, tokenizer)
    return model.to(device)


def _sequence_classifier(name_or_path: str | Path, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path),
        revision=revision,
        num_labels=1,
        dtype=dtype,
        trust_remote_code=False,
        use_safetensors=True,
    )


def load_external_tokenizer(name_or_path: str | Path, revision: str | None = None) -> PreTrainedTokenizerBase:
    """An external reward model's tokenizer, unchanged but for a pad token when it has none.

    Its vocabulary must match its embeddings, so no token is added: a missing pad token
    becomes EOS (or UNK). BERT-style tokenizers have no EOS and need none here.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=False)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer {name_or_path!r} has no pad, EOS or UNK token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_external_reward_model(
    name_or_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
) -> PreTrainedModel:
    """An external sequence classifier with one output; its pad token id is set from its tokenizer."""
    model = _sequence_classifier(name_or_path, dtype, revision)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def base_model_path(model: ModelConfig, cache_dir: str | None = None) -> str:
    """The hub id or folder to load a base model from; builds (once) a tiny model, or the
    snapshot of a GGUF file, if configured."""
    cache = Path(cache_dir) if cache_dir else None
    if model.tiny is not None:
        from slmrl_ray.tiny import tiny_model_dir  # builds only when the tiny preset asks

        return str(tiny_model_dir(model.family, model.tiny, cache))
    gguf = gguf_path(model.name_or_path, model.gguf_file)
    if gguf is not None:
        return str(gguf_snapshot_dir(gguf, cache))
    return model.name_or_path


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def lora_config(rank: int, alpha_per_rank: float, dropout: float, target_modules: str | Sequence[str],
                task_type: str) -> LoraConfig:
    """The LoRA of every stage: alpha = alpha_per_rank * rank (the study: 2r)."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha_per_rank * rank,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        task_type=task_type,
    )
