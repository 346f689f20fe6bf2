"""The HTTP API's request bodies and error responses (OpenAI-compatible where OpenAI has one).

Requests are pydantic models: a field of the wrong type or out of range is a 400 whose
JSON error names the field (`param`), in OpenAI's error shape. Fields OpenAI clients send
that we do not use (`user`, `stream_options`, ...) are accepted and ignored, as OpenAI's
own server does; unknown models are a 404.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sampling(_Request):
    max_tokens: int | None = Field(None, ge=1)  # unset: 16 for completions (as OpenAI), the cap for chat
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False

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


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)


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
