"""Batched generation from a policy: one code path for PPO rollouts, evaluation and serving.

Prompts are left-padded (and left-truncated, so a long prompt keeps its end, where the
question is) with an attention mask; the response is only the generated tokens; the
first EOS ends a response and everything after it is padding. This is the fix for the
original study's rollouts, where pad == EOS truncated every response of a left-padded
batch but the longest prompt's to one token (SPEC 1.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


class Generation(NamedTuple):
    """A generated batch. Shapes: B prompts, P prompt tokens, R response tokens."""

    query_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    query_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor  # [B, R] generated tokens, pad after the first EOS
    response_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-truncate each prompt to `max_length` tokens, then left-pad the batch."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_length:] for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("every prompt must contain at least one token")
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[B, R] mask that is 1 up to and including the first EOS of each row, 0 after it."""
    is_eos = (response_ids == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before t
    return (eos_before == 0).long()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding aware)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


class RowSampler(LogitsProcessor):
    """Per-row sampling with each row's own `torch.Generator`, inside `model.generate`.

    It applies temperature, top-k and top-p itself (HF adds its warpers after custom
    processors), draws each row's token from that row's generator (the global RNG for a row
    without one) and masks every other token, so HF's own sampling step can only take the
    drawn one. A seeded row's tokens then depend on its seed alone, whatever shares its batch.
    """

    def __init__(self, settings: SamplingSettings, generators: Sequence[torch.Generator | None]) -> None:
        self.generators = list(generators)
        self.warpers = [TemperatureLogitsWarper(settings.temperature)]
        if settings.top_k:
            self.warpers.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(settings.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        drawn = torch.cat([torch.multinomial(probs[row], 1, generator=generator)
                           for row, generator in enumerate(self.generators)])
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, drawn.unsqueeze(1), 0.0)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: SamplingSettings,
    max_prompt_length: int,
    device: torch.device,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Generation:
    """Sample (or greedily decode) one response per prompt.

    Without `generators`, sampling draws from the global RNG (seed it before calling); with
    them (one per prompt, None for the global RNG), each row draws from its own (`RowSampler`).
    """
    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_length)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    if settings.greedy:
        sampling = dict(do_sample=False)
    elif generators is not None:
        if len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
        sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                        logits_processor=LogitsProcessorList([RowSampler(settings, generators)]))
    else:
        sampling = dict(
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
        )
    output = model.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    response_ids = output[:, query_ids.shape[1] :]
    response_mask = response_mask_from_eos(response_ids, tokenizer.eos_token_id)
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Generation(query_ids, query_mask, response_ids, response_mask)


def decode_responses(tokenizer: PreTrainedTokenizerBase, generation: Generation) -> list[str]:
    """The response texts, without EOS or padding."""
    return [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(generation.response_ids, generation.response_mask)
    ]
