"""What a serving replica does with a model, without Ray: load it, generate, score.

`PolicyRunner.complete` runs the same `slmrl_ray.generation.generate` as PPO rollouts
and evaluation (left padding, masks, the first EOS ends a response), so greedy output
served over HTTP is token for token what `generate` gives offline. `RewardRunner.score`
goes through `RewardScorer`, formatted exactly as the reward model was trained. The Ray
Serve deployments (`slmrl_ray.serving.app`) and the naive single-process baseline of the
serving benchmark both wrap these.

Models are read from their artifact folder or URI (safetensors only; remote URIs are
downloaded once into a local cache named by a hash of the URI).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from slmrl_ray.device import resolve_device
from slmrl_ray.generation import SamplingSettings, generate
from slmrl_ray.models import load_causal_lm, load_reward_model, load_tokenizer
from slmrl_ray.scoring import RewardScorer
from slmrl_ray.serving.config import ServedModel


class RequestError(ValueError):
    """A request that cannot be served as asked (a 400, with a message naming the field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def local_folder(uri: str) -> Path:
    """A local folder holding the artifact at `uri` (downloaded once when remote)."""
    from slmrl_ray.storage import Storage

    place = Storage.from_uri(uri)
    if place.is_local:
        return Path(place.path)
    root = Path(os.environ.get("SLMRL_RAY_SERVE_CACHE") or Path(tempfile.gettempdir()) / "slmrl-ray-serve")
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:20]
    if not (target / "config.json").exists():
        place.download(target)
    return target


def _stage_setting(model: ServedModel, section: str, key: str, default):
    """A setting of the pipeline config that produced the artifact (its stage's config.json)."""
    from slmrl_ray.storage import Storage

    config = Storage.from_uri(model.stage_uri).child("config.json")
    return config.read_json().get(section, {}).get(key, default) if config.is_file() else default


@dataclass(frozen=True)
class Sampling:
    """One request's sampling: `temperature == 0` means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Choice:
    text: str
    token_ids: list[int]
    pieces: list[str]  # the text token by token (for streaming)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class PolicyRunner:
    """One loaded policy. Calls are serialised: one model, one forward pass at a time."""

    def __init__(self, model: ServedModel, device: str = "auto", max_prompt_tokens: int = 512) -> None:
        folder = local_folder(model.uri)
        self.served = model
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(folder)
        self.model = load_causal_lm(folder, self.tokenizer, device=self.device).eval()
        self.max_prompt_tokens = max_prompt_tokens
        self._lock = threading.Lock()

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def format_chat(self, messages: list[dict]) -> str:
        """The chat template when the tokenizer has one; else the contents joined by blank lines
        (the study's models are base models: their prompt format is text, then "\\n\\n")."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def check_prompt(self, prompt: str) -> int:
        """The prompt's token count; a `RequestError` when it is empty or over the limit."""
        used = self.prompt_tokens(prompt)
        if used == 0:
            raise RequestError("the prompt is empty after tokenization", "prompt")
        if used > self.max_prompt_tokens:
            raise RequestError(f"the prompt has {used} tokens; the limit is {self.max_prompt_tokens}", "prompt")
        return used

    def complete(self, prompt: str, sampling: Sampling) -> tuple[list[Choice], int]:
        """`n` choices for one prompt, and the prompt's token count."""
        return self.complete_batch([(prompt, sampling)])[0]

    def complete_batch(self, requests: list[tuple[str, Sampling]]) -> list[tuple[list[Choice], int]]:
        """Several requests in one `generate` call. They must share max_tokens, temperature and
        top_p (the caller groups them). A seeded request's rows draw from a generator of its own
        (`generation.RowSampler`), so its sample is the same alone or in any batch."""
        first = requests[0][1]
        used = [self.check_prompt(prompt) for prompt, _ in requests]
        greedy = first.temperature == 0
        counts = [1 if greedy else s.n for _, s in requests]  # greedy choices are identical: decode once
        prompts = [prompt for (prompt, _), count in zip(requests, counts) for _ in range(count)]
        settings = SamplingSettings(first.max_tokens, max(first.temperature, 1e-5), first.top_p, greedy=greedy)
        generators = None
        if not greedy and any(s.seed is not None for _, s in requests):
            own = [None if s.seed is None else torch.Generator(self.device).manual_seed(s.seed) for _, s in requests]
            generators = [generator for generator, count in zip(own, counts) for _ in range(count)]
        with self._lock:
            gen = generate(self.model, self.tokenizer, prompts, settings, self.max_prompt_tokens, self.device,
                           generators)
        rows = iter(zip(gen.response_ids, gen.response_mask))
        results = []
        for (_, sampling), count, prompt_tokens in zip(requests, counts, used):
            choices = [self._choice(ids, mask, sampling) for ids, mask in (next(rows) for _ in range(count))]
            results.append((choices * sampling.n if greedy else choices, prompt_tokens))
        return results

    def _choice(self, ids: torch.Tensor, mask: torch.Tensor, sampling: Sampling) -> Choice:
        token_ids = ids[mask.bool()].tolist()
        ended = bool(token_ids) and token_ids[-1] == self.tokenizer.eos_token_id
        pieces, previous = [], ""
        for end in range(1, len(token_ids) + 1):
            text = self.tokenizer.decode(token_ids[:end], skip_special_tokens=True)
            pieces.append(text[len(previous):])
            previous = text
        text, stopped = _cut_at_stop(previous, sampling.stop)
        if stopped:  # keep the pieces consistent with the cut text
            kept, total = [], 0
            for piece in pieces:
                if total + len(piece) > len(text):
                    kept.append(piece[: len(text) - total])
                    break
                kept.append(piece)
                total += len(piece)
            pieces = [p for p in kept if p]
        return Choice(text, token_ids, pieces, "stop" if ended or stopped else "length")


class RewardRunner:
    """One loaded reward model, scoring (prompt, response) pairs in batches."""

    def __init__(self, model: ServedModel, device: str = "auto", batch_size: int = 16) -> None:
        folder = local_folder(model.uri)
        self.served = model
        device_ = resolve_device(device)
        tokenizer = load_tokenizer(folder)
        max_length = _stage_setting(model, "reward", "max_length", 512)
        self.scorer = RewardScorer(load_reward_model(folder, tokenizer, device=device_), tokenizer,
                                   max_length, batch_size, device_)
        self._lock = threading.Lock()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        with self._lock:
            return self.scorer.score(prompts, responses).tolist()
