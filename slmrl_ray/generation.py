"""Batched generation from a policy: one code path for PPO rollouts, evaluation and serving.

Prompts are left-padded (and left-truncated, so a long prompt keeps its end, where the
question is) with an attention mask; the response is only the generated tokens; the
first EOS ends a response and everything after it is padding. This is the fix for the
original study's rollouts, where pad == EOS truncated every response of a left-padded
batch but the longest prompt's to one token (SPEC 1.5).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
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
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | Sequence[int]], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-truncate each prompt (a text, or its tokens) to `max_length` tokens, then left-pad the batch."""
    encoded = [list(p if not isinstance(p, str) else tokenizer(p, add_special_tokens=False)["input_ids"])[-max_length:]
               for p in prompts]
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


GREEDY_BELOW = 1e-5
"""A temperature below this decodes greedily (vLLM's threshold): dividing the logits by a tiny
temperature overflows to inf, and the draw from their softmax fails."""


@dataclass(frozen=True)
class RowSettings:
    """One row's sampling, length, stop strings and generator: rows with different settings
    share one `generate_rows` call (the serving engine), and each stops on its own."""

    max_new_tokens: int
    temperature: float = 1.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    generator: torch.Generator | None = None  # None: the global RNG
    logprobs: bool = False  # keep this row's raw logits for log-probabilities
    cancel: threading.Event | None = None  # set: the row ends at the next step (finish reason "abort")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class MixedRowSampler(LogitsProcessor):
    """Picks each row's next token by that row's own settings (penalties, temperature, top-k,
    top-p, greedy or its generator) and masks every other token, so HF's greedy step takes it.

    HF's own warpers do temperature, top-k and top-p, one row at a time; the draw uses the row's
    generator (or the global RNG), so a seeded row's tokens depend on its seed alone,
    whatever shares its batch.
    """

    def __init__(self, rows: Sequence[RowSettings], prompt_width: int) -> None:
        self.rows, self.prompt_width = list(rows), prompt_width
        self.warpers = [
            [TemperatureLogitsWarper(row.temperature)] + ([TopKLogitsWarper(row.top_k)] if row.top_k else [])
            + ([TopPLogitsWarper(row.top_p)] if row.top_p < 1.0 else [])
            if not row.greedy else []
            for row in self.rows
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        drawn = []
        for index, (row, warpers) in enumerate(zip(self.rows, self.warpers)):
            logits = scores[index : index + 1].float()
            if row.presence_penalty or row.frequency_penalty:
                counts = torch.bincount(input_ids[index, self.prompt_width :], minlength=logits.shape[-1])
                counts = counts[: logits.shape[-1]].to(logits.dtype)
                logits = logits - row.frequency_penalty * counts - row.presence_penalty * (counts > 0).to(logits.dtype)
            if row.greedy:
                drawn.append(logits.argmax(dim=-1))
                continue
            for warper in warpers:
                logits = warper(input_ids[index : index + 1], logits)
            drawn.append(torch.multinomial(torch.softmax(logits, dim=-1)[0], 1, generator=row.generator))
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, torch.cat(drawn).view(-1, 1), 0.0)


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
    them (one per prompt, None for the global RNG), each row draws from its own
    (`MixedRowSampler`).
    """
    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_length)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    if settings.greedy or settings.temperature < GREEDY_BELOW:
        sampling = dict(do_sample=False)
    elif generators is not None:
        if len(generators) != len(prompts):
            raise ValueError(f"{len(generators)} generators for {len(prompts)} prompts")
        rows = [RowSettings(settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k,
                            generator=generator) for generator in generators]
        sampling = dict(do_sample=False,  # the token is drawn in MixedRowSampler; HF's argmax takes it
                        logits_processor=LogitsProcessorList([MixedRowSampler(rows, query_ids.shape[1])]))
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


# ----------------------------------------------------------------------------- serving rows


@dataclass
class RowOutput:
    token_ids: list[int]  # the tokens returned: up to EOS, the stop string's last token, or the length
    pieces: list[str]  # their text as it was sent, piece by piece (without a stop string)
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "abort" (cancelled)
    logits: list[torch.Tensor] | None = None  # [V] raw logits before each returned token


class TextStream:
    """A row's text, token by token: `tokenizers`' `DecodeStream` on a fast tokenizer (it holds
    back a token that ends mid-character), else the difference of decoded prefixes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self.backend, self.stream = backend, DecodeStream(skip_special_tokens=True)
        else:
            self.backend, self.ids, self.text = None, [], ""

    def step(self, token: int) -> str:
        if self.backend is not None:
            return self.stream.step(self.backend, token) or ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character cut in half: wait for its other bytes
            return ""
        piece, self.text = text[len(self.text):], text
        return piece


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


class RowStops(StoppingCriteria):
    """Ends each row on its own: at EOS, at its `max_new_tokens`, once its text holds one of its
    stop strings, or once its `cancel` event is set (the client went away).

    It detokenises incrementally (`TextStream`) and hands each row's new text to
    `on_piece(row, text)` as soon as it is final: text that could still become a stop string
    is held back until it cannot, and a stop string and what follows it are never sent.
    """

    def __init__(self, rows: Sequence[RowSettings], prompt_width: int, tokenizer: PreTrainedTokenizerBase,
                 on_piece: Callable[[int, str], None] | None = None,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.rows, self.prompt_width = list(rows), prompt_width
        self.eos = tokenizer.eos_token_id
        self.streams = [TextStream(tokenizer) for _ in self.rows]
        self.texts = ["" for _ in self.rows]  # decoded so far
        self.pieces: list[list[str]] = [[] for _ in self.rows]  # sent so far (the row's text, once it ends)
        self.sent = [0 for _ in self.rows]
        self.lengths: list[int | None] = [None for _ in self.rows]
        self.reasons: list[str] = ["length" for _ in self.rows]
        self.on_piece, self.on_step = on_piece, on_step

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        if self.on_step is not None:
            self.on_step(sum(length is None for length in self.lengths))
        for index, row in enumerate(self.rows):
            if self.lengths[index] is not None:
                continue
            if row.cancel is not None and row.cancel.is_set():
                self.lengths[index], self.reasons[index] = generated, "abort"
                continue
            token = int(input_ids[index, -1])
            piece = self.streams[index].step(token)
            before = len(self.texts[index])
            self.texts[index] += piece
            text = self.texts[index]
            start = max(0, before - max(map(len, row.stop), default=0))
            cuts = [found for stop in row.stop if stop and (found := text.find(stop, start)) >= 0]
            if cuts:
                self.lengths[index], self.reasons[index] = generated, "stop"
                self._send(index, min(cuts))
            elif token == self.eos or generated >= row.max_new_tokens:
                self.lengths[index] = generated
                self.reasons[index] = "stop" if token == self.eos else "length"
                self._send(index, len(text))
            else:
                self._send(index, len(text) - _held_back(text, row.stop))
        return torch.tensor([length is not None for length in self.lengths], device=input_ids.device)

    def finish(self) -> None:
        """Rows still open when `generate` ended (it stops at the longest row's length)."""
        for index in range(len(self.rows)):
            if self.lengths[index] is None:
                self._send(index, len(self.texts[index]))

    def _send(self, index: int, upto: int) -> None:
        if upto > self.sent[index]:
            piece = self.texts[index][self.sent[index]:upto]
            self.pieces[index].append(piece)
            self.sent[index] = upto
            if self.on_piece is not None:
                self.on_piece(index, piece)


@torch.no_grad()
def generate_rows(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Sequence[int]],
    rows: Sequence[RowSettings],
    max_prompt_length: int,
    device: torch.device,
    on_piece: Callable[[int, str], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[RowOutput]:
    """One `generate` call for rows with different settings (the serving engine).

    The batch runs until its longest row ends; a row that ends earlier (EOS, a stop string,
    its own max_new_tokens, its cancel event) gets padding after that, and returns only its
    own tokens. Stop strings end a row inside the loop, not after the fact. `on_piece(row,
    text)` streams each row's text as it is decoded (`RowStops`); `on_step(rows)` is called
    once per step with the number of rows still generating.
    """
    query_ids, query_mask = encode_prompts(tokenizer, prompts, max_prompt_length)
    width = query_ids.shape[1]
    stops = RowStops(rows, width, tokenizer, on_piece, on_step)
    keep_logits = any(row.logprobs for row in rows)
    output = model.generate(
        input_ids=query_ids.to(device),
        attention_mask=query_mask.to(device),
        max_new_tokens=max(row.max_new_tokens for row in rows),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=False,  # the token is drawn in MixedRowSampler; HF's argmax takes it
        logits_processor=LogitsProcessorList([MixedRowSampler(rows, width)]),
        stopping_criteria=StoppingCriteriaList([stops]),
        output_logits=keep_logits,
        return_dict_in_generate=True,
    )
    stops.finish()
    sequences = output.sequences[:, width:]
    results = []
    for index, row in enumerate(rows):
        length = stops.lengths[index] if stops.lengths[index] is not None else sequences.shape[1]
        logits = [step[index].float().cpu() for step in output.logits[:length]] if row.logprobs else None
        results.append(RowOutput(sequences[index, :length].tolist(), stops.pieces[index], stops.reasons[index],
                                 logits))
    return results


class PromptLogprobs(NamedTuple):
    """A prompt's scores. Shapes: L prompt tokens, k alternatives; row t is for token t + 1
    (the first token has no context to be scored in)."""

    logprobs: torch.Tensor  # [L-1] each token's log-probability given the tokens before it
    top_logprobs: torch.Tensor  # [L-1, k] the k likeliest tokens' log-probabilities at each position
    top_ids: torch.Tensor  # [L-1, k] and their ids


@torch.no_grad()
def score_prompts(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    tops: Sequence[int],
    pad_token_id: int,
    device: torch.device,
    rows_per_pass: int = 8,
) -> list[PromptLogprobs]:
    """The log-softmax of one forward pass over each prompt (`tops[i]` alternatives for prompt i),
    `rows_per_pass` prompts at a time. Right padding: each real token sees only the real tokens
    before it, at their own positions, as in a forward pass over that prompt alone."""
    results = []
    for start in range(0, len(prompts), rows_per_pass):
        chunk = prompts[start : start + rows_per_pass]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([list(ids) + [pad_token_id] * (width - len(ids)) for ids in chunk])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk])
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, ids in enumerate(chunk):
            logprobs = torch.log_softmax(logits[row, : len(ids) - 1].float(), dim=-1)
            labels = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)
            top = logprobs.topk(tops[start + row], dim=-1)
            results.append(PromptLogprobs(logprobs.gather(1, labels[:, None])[:, 0].cpu(), top.values.cpu(),
                                          top.indices.cpu()))
    return results
