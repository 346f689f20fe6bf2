"""What a serving replica does with a model, without Ray: load it, generate, score.

`PolicyRunner.complete_batch` runs `slmrl_ray.generation.generate_rows`: the same encoding
as PPO rollouts and evaluation (left padding, masks, the first EOS ends a response), with
each request's own settings per row, so greedy output served over HTTP is token for token
what `generate` gives offline (a test checks it); a request that echoes its prompt with
logprobs gets the prompt scored by one forward pass (`generation.score_prompts`). `RewardRunner.score`
goes through `RewardScorer`, formatted exactly as the reward model was trained. The Ray
Serve deployments (`slmrl_ray.serving.app`) and the naive single-process baseline of the
serving benchmark both wrap these.

Models are read from their artifact folder or URI (safetensors only; remote URIs are
downloaded once into a local cache named by a hash of the URI).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from slmrl_ray.device import resolve_device
from slmrl_ray.generation import PromptLogprobs, RowOutput, RowSettings, generate_rows, score_prompts
from slmrl_ray.models import load_causal_lm, load_reward_model, load_tokenizer
from slmrl_ray.scoring import RewardScorer
from slmrl_ray.serving.config import ServedModel


class RequestError(ValueError):
    """A request that cannot be served as asked (a 400, with a message naming the field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def local_folder(uri: str, files: dict[str, dict] | None = None) -> Path:
    """A local folder holding the artifact at `uri` (downloaded once when remote), checked file
    by file against `files` (its commit's sizes and sha256) when given: a replica never loads
    weights that differ from what its stage committed (`storage.ArtifactError` otherwise)."""
    from slmrl_ray.storage import ArtifactError, Storage, verify

    place = Storage.from_uri(uri)
    if place.is_local:
        folder = Path(place.path)
    else:
        root = Path(os.environ.get("SLMRL_RAY_SERVE_CACHE") or Path(tempfile.gettempdir()) / "slmrl-ray-serve")
        folder = root / hashlib.sha256(uri.encode()).hexdigest()[:20]
        if (folder / "config.json").exists() and files is not None:
            try:
                verify(folder, {"files": files}, uri)
                return folder
            except ArtifactError:
                shutil.rmtree(folder)  # a cached copy cut short or changed: download it again
        if not (folder / "config.json").exists():
            place.download(folder)
    if files is not None:
        verify(folder, {"files": files}, uri)
    return folder


def _stage_setting(model: ServedModel, section: str, key: str, default):
    """A setting of the pipeline config that produced the artifact (its stage's config.json)."""
    from slmrl_ray.storage import Storage

    config = Storage.from_uri(model.stage_uri).child("config.json")
    return config.read_json().get(section, {}).get(key, default) if config.is_file() else default


@dataclass(frozen=True)
class Sampling:
    """One request's sampling: a temperature below `generation.GREEDY_BELOW` (0, say) means greedy."""

    max_tokens: int  # 0: nothing generated (echo: the prompt alone)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k likeliest alternatives
    score_prompt: bool = False  # with logprobs: the prompt's tokens scored too (echo)


@dataclass(frozen=True)
class Choice:
    text: str
    token_ids: list[int]  # the tokens returned (usage counts these)
    pieces: list[str]  # the text as it was streamed
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "abort" (cancelled)
    logprobs: list[dict] | None = None  # per token: token_id, token, logprob, top [{token_id, token, logprob}]
    prompt_logprobs: list[dict] | None = None  # the same per prompt token; the first has logprob and top None


@dataclass
class Request:
    """One request to a policy: its prompt's tokens, its sampling, and optionally where its
    text goes as it is generated (`on_piece(choice, text)`) and an event that cancels it."""

    prompt_ids: list[int]
    sampling: Sampling
    on_piece: Callable[[int, str], None] | None = None
    cancel: threading.Event | None = None


class PolicyRunner:
    """One loaded policy. Calls are serialised: one model, one forward pass at a time."""

    def __init__(self, model: ServedModel, device: str = "auto", max_prompt_tokens: int = 512) -> None:
        folder = local_folder(model.uri, model.files)
        self.served = model
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(folder)
        self.model = load_causal_lm(folder, self.tokenizer, device=self.device).eval()
        self.max_prompt_tokens = max_prompt_tokens
        self.on_tokens: Callable[[int], None] | None = None  # told, each step, how many tokens it made
        self._lock = threading.Lock()

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def format_chat(self, messages: list[dict]) -> str:
        """The chat template when the tokenizer has one; else the contents joined by blank lines
        (the study's models are base models: their prompt format is text, then "\\n\\n")."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages)

    def check_prompt(self, prompt: str) -> list[int]:
        """The prompt's tokens (tokenised once per request); a `RequestError` when it has none
        or more than the limit."""
        ids = self.prompt_ids(prompt)
        if not ids:
            raise RequestError("the prompt is empty after tokenization", "prompt")
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}", "prompt")
        return ids

    def complete(self, prompt: str, sampling: Sampling) -> tuple[list[Choice], int]:
        """`n` choices for one prompt, and the prompt's token count."""
        return self.complete_batch([Request(self.check_prompt(prompt), sampling)])[0]

    def complete_batch(self, requests: list[Request]) -> list[tuple[list[Choice], int]]:
        """Several requests in one `generate` call, whatever their settings
        (`generation.generate_rows`); for each, its choices and its prompt's token count.

        A seeded request's rows draw from a generator of its own, so its sample is the same
        alone or in any batch. A request's `on_piece(choice, text)` gets its text as it is
        generated; setting its `cancel` event ends its rows at the next step. A request with
        `score_prompt` gets its prompt scored by one forward pass (`generation.score_prompts`,
        batched with the others that ask); one with max_tokens 0 generates nothing.
        """
        rows, prompts, owners = [], [], []  # owners: per row, its request and the choices it makes
        for request in requests:
            sampling = request.sampling
            if sampling.max_tokens == 0:
                continue
            row = RowSettings(sampling.max_tokens, sampling.temperature, sampling.top_p,
                              presence_penalty=sampling.presence_penalty,
                              frequency_penalty=sampling.frequency_penalty, stop=sampling.stop,
                              logprobs=sampling.logprobs is not None, cancel=request.cancel)
            greedy = row.greedy
            if not greedy and sampling.seed is not None:
                row = dataclasses.replace(row, generator=torch.Generator(self.device).manual_seed(sampling.seed))
            # greedy choices are identical: one row makes all n
            for choices in ([range(sampling.n)] if greedy else [[c] for c in range(sampling.n)]):
                rows.append(row)
                prompts.append(request.prompt_ids)
                owners.append((request, list(choices)))

        def on_piece(row: int, piece: str) -> None:
            request, choices = owners[row]
            if request.on_piece is not None:
                for choice in choices:
                    request.on_piece(choice, piece)

        def on_step(active: int) -> None:
            if self.on_tokens is not None:
                self.on_tokens(active)

        scored = [request for request in requests if request.sampling.score_prompt]
        with self._lock:
            outputs = generate_rows(self.model, self.tokenizer, prompts, rows, self.max_prompt_tokens, self.device,
                                    on_piece, on_step) if rows else []
            scores = score_prompts(self.model, [r.prompt_ids for r in scored], [r.sampling.logprobs for r in scored],
                                   self.tokenizer.pad_token_id, self.device) if scored else []
        nothing = RowOutput([], [], "length", [])  # max_tokens 0
        made: dict[int, list[Choice]] = {id(request): [] for request in requests}
        for request in requests:
            if request.sampling.max_tokens == 0:
                made[id(request)] = [self._choice(nothing, request.sampling)] * request.sampling.n
        for output, (request, choices) in zip(outputs, owners):
            made[id(request)] += [self._choice(output, request.sampling)] * len(choices)
        for request, score in zip(scored, scores):
            entries = self._prompt_logprobs(request.prompt_ids, score)
            made[id(request)] = [dataclasses.replace(c, prompt_logprobs=entries) for c in made[id(request)]]
        return [(made[id(request)], len(request.prompt_ids)) for request in requests]

    def _choice(self, output: RowOutput, sampling: Sampling) -> Choice:
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = [self._logprobs(token, logits, sampling.logprobs)
                        for token, logits in zip(output.token_ids, output.logits)]
        return Choice("".join(output.pieces), output.token_ids, output.pieces, output.finish_reason, logprobs)

    def _prompt_logprobs(self, prompt_ids: list[int], score: PromptLogprobs) -> list[dict]:
        """The prompt's entries, shaped as `_logprobs`'; the first token has no context: None."""
        first = {"token_id": prompt_ids[0], "token": self.tokenizer.decode([prompt_ids[0]]), "logprob": None,
                 "top": None}
        return [first] + [
            {"token_id": token, "token": self.tokenizer.decode([token]), "logprob": float(logprob),
             "top": [{"token_id": int(i), "token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                     for v, i in zip(values, ids)]}
            for token, logprob, values, ids in zip(prompt_ids[1:], score.logprobs, score.top_logprobs, score.top_ids)]

    def _logprobs(self, token: int, logits: torch.Tensor, top: int) -> dict:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
        return {"token_id": token, "token": self.tokenizer.decode([token]), "logprob": float(logprobs[token]),
                "top": [{"token_id": int(i), "token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                        for v, i in zip(values, ids)]}


class RewardRunner:
    """One loaded reward model, scoring (prompt, response) pairs in batches."""

    def __init__(self, model: ServedModel, device: str = "auto", batch_size: int = 16) -> None:
        folder = local_folder(model.uri, model.files)
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
