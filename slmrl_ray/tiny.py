"""Build the tiny preset's base models: a BPE tokenizer and tiny GPT-NeoX / Llama models.

The offline stand-ins for the study's hub models. The tokenizer is byte-level BPE (the
same kind Pythia and SmolLM2 use) trained on the project's generated corpora; the
model is built from config and pretrained briefly on the three corpus styles, so SFT
starts from a model that already writes the corpora's language, as it would from a
real pretrained model. The result is saved like a hub snapshot (config.json,
model.safetensors, tokenizer files) under the cache folder, keyed by a hash of its
settings, and loaded back through `slmrl_ray.models` like any hub model: a second
run does not rebuild it.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast, AutoModelForCausalLM

from slmrl_ray.config import CORPUS_KINDS, TinyModelConfig, fingerprint
from slmrl_ray.data import generate_documents, sft_text
from slmrl_ray.model_cache import build_lock, default_cache_dir, save_snapshot

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def pretraining_texts(num_documents: int, seed: int) -> list[str]:
    """A mix of the three generated corpus styles (a different seed from the run's data)."""
    texts = []
    for offset, kind in enumerate(CORPUS_KINDS):
        docs = generate_documents(kind, num_documents, seed + offset)
        texts.extend(sft_text(kind, doc) for doc in docs)
    random.Random(seed).shuffle(texts)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with an EOS token and a distinct pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1_000_000,
    )


def build_model(family: str, cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast):
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    shape = dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    if family == "gpt_neox":  # Pythia: untied embeddings, parallel residual, partial rotary
        config = GPTNeoXConfig(**ids, **shape, tie_word_embeddings=False)
    elif family == "llama":  # SmolLM2: tied embeddings, grouped-query attention
        config = LlamaConfig(
            **ids, **shape, num_key_value_heads=max(1, cfg.num_heads // 2), tie_word_embeddings=True,
            rope_theta=cfg.rope_theta,
        )
    else:
        raise ValueError(f"unknown model family {family!r}")
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config)


def pretrain(model, tokenizer, texts: list[str], cfg: TinyModelConfig) -> float:
    """Plain causal-LM pretraining on packed blocks; returns the final training loss."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    block = cfg.pretrain_block_size
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_learning_rate, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.pretrain_steps):
        rows = torch.randint(len(blocks), (cfg.pretrain_batch_size,), generator=generator)
        batch = blocks[rows]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def tiny_model_dir(family: str, cfg: TinyModelConfig, cache_dir: Path | None = None) -> Path:
    """The folder of a pretrained tiny model, built on first use and cached after."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / "tiny-models" / f"{family}-{fingerprint(family, cfg)}"
    if (target / "model.safetensors").exists():
        return target
    with build_lock(target):
        if (target / "model.safetensors").exists():  # built while this process waited
            return target
        texts = pretraining_texts(cfg.pretrain_documents, cfg.seed)
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        model = build_model(family, cfg, tokenizer)
        loss = pretrain(model, tokenizer, texts, cfg)
        if not math.isfinite(loss):
            raise RuntimeError(f"tiny {family} pretraining diverged (loss {loss})")
        save_snapshot(model, tokenizer, target)
    return target
