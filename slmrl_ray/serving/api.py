"""The HTTP API's request bodies, answers and error responses (OpenAI-compatible where OpenAI has one).

Requests are pydantic models: a field of the wrong type or out of range is a 400 whose
JSON error names the field (`param`), in OpenAI's error shape. OpenAI fields the server
does not implement (`best_of` > 1, `logit_bias`, `tools`, `response_format` other than
text, `suffix`, ...) are a 400 naming the field, never silently dropped; fields that do not
change the answer (`user`, `metadata`, ...) are accepted and ignored, as OpenAI's own
server does; unknown models are a 404.
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with the usage (and `"usage": null` on the others)


# OpenAI fields this server does not implement: accepted at their no-op value, else a 400
# naming the field (never silently dropped).
_NO_OP = {"best_of": (None, 1), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
          "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
          "suffix": (None, ""), "response_format": (None, {"type": "text"})}


class _Sampling(_Request):
    max_tokens: int | None = Field(None, ge=0)  # unset: 16 for completions (as OpenAI), the cap for chat; 0 needs echo
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name; wins over max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: object = None
    logit_bias: object = None
    tools: object = None
    tool_choice: object = None
    functions: object = None
    function_call: object = None
    parallel_tool_calls: object = None
    suffix: object = None
    response_format: object = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do (best_of > 1, tools, ...)."""
        for name, no_ops in _NO_OP.items():
            value = getattr(self, name)
            if not any(value is None if no_op is None else (type(value) is type(no_op) and value == no_op)
                       for no_op in no_ops):
                return name
        return None

    def asked_tokens(self) -> tuple[int | None, str]:
        """The requested length and the field that asked for it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stops(self) -> tuple[str, ...]:
        return tuple([self.stop] if isinstance(self.stop, str) else (self.stop or []))


class CompletionRequest(_Sampling):
    model: str
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)  # each token's log-probability and its k likeliest alternatives
    echo: bool = False  # the prompt, then the completion

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class Pair(_Request):
    prompt: str
    response: str


class RewardsRequest(_Request):
    model: str  # "reward/<model>/<corpus>" or the cell "<model>/<corpus>"
    pairs: list[Pair] = Field(min_length=1)


class CompareRequest(_Request):
    cell: str  # "<model>/<corpus>"
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # unset: 64, or the cap when lower
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    seed: int | None = Field(0, ge=0, le=2**63 - 1)


class BestOfNRequest(_Request):
    model: str  # a policy id
    prompt: str = Field(min_length=1)
    n: int = Field(4, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # unset: 64, or the cap when lower
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict | None = None) -> JSONResponse:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(errors: list[dict]) -> JSONResponse:
    """A pydantic/FastAPI validation failure as a 400 that names the first bad field."""
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return error(400, f"{param}: {message}" if param else message, param)


# ---------------------------------------------------------------- answers


def _text_offsets(entries: list[dict], start: int) -> list[int]:
    offsets = []
    for e in entries:
        offsets.append(start)
        start += len(e["token"])
    return offsets


def logprobs_body(choice: dict, chat: bool, offset: int) -> dict | None:
    """A generated choice's log-probabilities in OpenAI's shape, with each token's id (`token_id(s)`).

    Completions that echo a scored prompt list its tokens first (offsets from 0; the first token
    has no logprob and no alternatives: null), then the completion's (offsets from `offset`).
    """
    entries = choice["logprobs"]
    if entries is None:
        return None
    if chat:
        return {"content": [
            {"token": e["token"], "token_id": e["token_id"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
             "top_logprobs": [{"token": t["token"], "token_id": t["token_id"], "logprob": t["logprob"],
                               "bytes": list(t["token"].encode())} for t in e["top"]]}
            for e in entries]}
    prompt = choice.get("prompt_logprobs") or []
    offsets = _text_offsets(prompt, 0) + _text_offsets(entries, offset)
    entries = prompt + entries
    return {"tokens": [e["token"] for e in entries], "token_ids": [e["token_id"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else {t["token"]: t["logprob"] for t in e["top"]}
                             for e in entries], "text_offset": offsets}


def choice_body(index: int, choice: dict, chat: bool, echo: str = "") -> dict:
    """A generated choice as OpenAI answers it (completions: the text after any echo)."""
    logprobs = logprobs_body(choice, chat, len(echo))
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": choice["text"]},
                "finish_reason": choice["finish_reason"], "logprobs": logprobs}
    return {"index": index, "text": echo + choice["text"], "finish_reason": choice["finish_reason"],
            "logprobs": logprobs}


class Chunks:
    """OpenAI's streaming chunks (server-sent events) of one completion."""

    def __init__(self, meta: dict, chat: bool, include_usage: bool) -> None:
        self.meta, self.chat = meta, chat
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.extra = {"usage": None} if include_usage else {}  # OpenAI: null on every chunk but the last

    def _event(self, payload: dict) -> str:
        return f"data: {json.dumps({**self.meta, 'object': self.kind, **payload})}\n\n"

    def choice(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self._event({"choices": [choice], **self.extra})

    def usage(self, usage: dict) -> str:
        return self._event({"choices": [], "usage": usage})

    @staticmethod
    def error(message: str, status: int) -> str:
        """An error once the 200 has gone out (OpenAI's clients raise it from the stream)."""
        body = {"message": message, "type": "server_error", "param": None, "code": status}
        return f"data: {json.dumps({'error': body})}\n\n"
