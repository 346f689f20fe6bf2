"""The Ray Serve application: one deployment graph for every policy and reward model.

    serve run serve_configs/tiny.yaml            # a Serve config whose import_path is build_app
    slmrl-ray serve ~/slmrl_ray_results/tiny-grid  # the same, from a registry, on 127.0.0.1

Three deployments:
- `PolicyDeployment` and `RewardDeployment` (`serving.deployments`) host the policies
  (multiplexed) and the reward models, batching concurrent requests;
- `Gateway`, the FastAPI ingress, validates requests, applies the limits and composes the
  other two through deployment handles: `/v1/models`, `/v1/completions`,
  `/v1/chat/completions` (with `stream`), `/v1/rewards`, `/v1/compare`, `/v1/best_of_n`,
  `/health`. Every answer names its provenance (cell, stage, artifact fingerprint).

Generation (`generation.generate_rows`) batches requests whatever their sampling settings;
each row has its own length, stop strings (ended inside the loop), penalties, seed
(a generator of its own) and log-probabilities. Streaming sends each row's text as it is
decoded (incremental detokenisation; text that may become a stop string is held back),
from inside the shared batch. A request whose client disconnects, or that passes
`limits.request_timeout_s`, is cancelled in the replica: its rows end at the next step.

Errors are JSON in OpenAI's shape: a bad field or a field this server does not implement is
a 400 naming it, a reward model asked to generate a 400, an unknown model a 404, a body
over the limit a 413, an overloaded deployment (its queue full) or a replica that died
mid-request a 503, a request over the time limit a 504 that tells clients not to retry
(`x-should-retry: false`), anything unexpected a 500. With an API key (`api_key`, or
$SLMRL_RAY_API_KEY where the app is built), every route but /health needs
`Authorization: Bearer <key>`, else a 401.
"""

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmrl_ray.serving.api import (
    BestOfNRequest,
    ChatCompletionRequest,
    Chunks,
    CompareRequest,
    CompletionRequest,
    RewardsRequest,
    choice_body,
    error,
    validation_error,
)
from slmrl_ray.serving.config import Limits, ServedModel, ServeArgs, Sizing, build_catalog, parse_args
from slmrl_ray.serving.deployments import PolicyDeployment, RewardDeployment

logger = logging.getLogger("ray.serve")
app = FastAPI(title="slmrl-ray", description="SFT and PPO policies and reward models of slmrl-ray runs")


# A replica lost mid-request (died, or no longer routable) or a deployment with no replica up:
# Serve replaces them, so a 503 that invites a retry, never a 500.
_REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class Failure(Exception):
    """An error answer decided inside a handler: status, message, field."""

    def __init__(self, status: int, message: str, param: str | None = None, retry: bool = True) -> None:
        super().__init__(message)
        self.status, self.param, self.retry = status, param, retry


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    return validation_error(exc.errors())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail), kind="not_found" if exc.status_code == 404 else "invalid_request_error")


@app.exception_handler(Failure)
async def _failure(request: Request, exc: Failure):
    kind = {404: "not_found", 503: "overloaded", 504: "timeout"}.get(exc.status, "invalid_request_error")
    # OpenAI's clients retry 5xx unless told not to: overload, yes, after a second; a timeout, no
    # (the same request would time out again, multiplying the load).
    headers = {"Retry-After": "1"} if exc.retry else {"x-should-retry": "false"}
    return error(exc.status, str(exc), exc.param, kind, headers if exc.status >= 500 else None)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    """Anything a handler did not expect: still OpenAI's JSON shape (Starlette logs the traceback)."""
    return error(500, f"internal server error ({type(exc).__name__}); the server log has the details",
                 kind="server_error")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _Admission:
    """At most `app.state.max_admitted` requests in this ingress replica at once (a stream counts
    until its last byte); beyond, a JSON 503. Serve's own limits on the ingress are set above
    this (`_ingress_options`), because its proxy answers a full ingress queue itself, in text/plain."""

    def __init__(self, asgi) -> None:
        self.asgi, self.admitted = asgi, 0

    async def __call__(self, scope, receive, send) -> None:
        limit = getattr(scope.get("app").state, "max_admitted", None) if scope["type"] == "http" else None
        if limit is not None and self.admitted >= limit:
            response = error(503, "the server is at capacity; retry shortly", kind="overloaded",
                             headers={"Retry-After": "1"})
            return await response(scope, receive, send)
        self.admitted += 1
        try:
            await self.asgi(scope, receive, send)
        finally:
            self.admitted -= 1


app.add_middleware(_Admission)  # added first, so it runs last: after the key and body checks


@app.middleware("http")
async def _limit_body(request: Request, call_next):
    """Bodies over `limits.max_body_bytes` are a 413, before any parsing."""
    limit = getattr(request.app.state, "max_body_bytes", None)
    if limit is not None and request.method in ("POST", "PUT", "PATCH"):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return error(413, f"the request body is over the limit of {limit} bytes")
        if declared is None and len(await request.body()) > limit:
            return error(413, f"the request body is over the limit of {limit} bytes")
    return await call_next(request)


@app.middleware("http")
async def _authorize(request: Request, call_next):
    """With an API key, every route but /health needs `Authorization: Bearer <key>` (compared as
    sha256 digests in constant time). Added last, so it runs first: before any body is read."""
    digest = getattr(request.app.state, "api_key_digest", None)
    if digest is not None and request.url.path != "/health":
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = key_digest(token.strip()) if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given, digest):
            return error(401, "a valid API key is required: send `Authorization: Bearer <key>`",
                         kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


# ---------------------------------------------------------------- the ingress


@serve.deployment
@serve.ingress(app)
class Gateway:
    def __init__(self, policy, reward, models: dict[str, dict], limits: dict, api_key_digest: str | None = None,
                 max_admitted: int | None = None) -> None:
        self.policy, self.reward = policy, reward
        self.catalog = {model_id: ServedModel(**fields) for model_id, fields in models.items()}
        self.limits = Limits(**limits)
        app.state.max_body_bytes = self.limits.max_body_bytes
        app.state.api_key_digest = api_key_digest
        app.state.max_admitted = max_admitted

    # -- helpers

    def _policy(self, model_id: str) -> ServedModel:
        model = self.catalog.get(model_id)
        known = ", ".join(sorted(m for m, s in self.catalog.items() if s.stage != "reward"))
        if model is None:
            raise Failure(404, f"model {model_id!r} is not served (policies: {known})", "model")
        if model.stage == "reward":
            raise Failure(400, f"model {model_id!r} is a reward model: it scores with /v1/rewards and does not "
                               f"generate (policies: {known})", "model")
        return model

    def _reward(self, name: str) -> ServedModel:
        model_id = name if name.startswith("reward/") else f"reward/{name}"
        model = self.catalog.get(model_id)
        if model is None:
            known = ", ".join(sorted(m for m, s in self.catalog.items() if s.stage == "reward"))
            raise Failure(404, f"reward model {name!r} is not served (reward models: {known})", "model")
        return model

    def _max_tokens(self, asked: int | None, default: int) -> int:
        """The request's max_tokens within the limit; unset: `default`, or the limit when lower."""
        return min(default, self.limits.max_tokens) if asked is None else asked

    def _check_limits(self, max_tokens: int, n: int = 1, field: str = "max_tokens") -> None:
        if max_tokens > self.limits.max_tokens:
            raise Failure(400, f"{field}: {max_tokens} is over the limit of {self.limits.max_tokens}", field)
        if n > self.limits.max_n:
            raise Failure(400, f"n: {n} is over the limit of {self.limits.max_n}", "n")

    async def _call(self, response, cancel=None):
        """Await a deployment call under the request time limit; overload and a dead replica are
        a 503, a timeout a 504 that says not to retry. A call that fails or times out is
        cancelled in its replica (`cancel`, else the response's own), freeing its batch slot."""
        try:
            return await asyncio.wait_for(response, timeout=self.limits.request_timeout_s)
        except BaseException as failure:
            (cancel or getattr(response, "cancel", lambda: None))()
            if isinstance(failure, BackPressureError):
                raise Failure(503, "the server is at capacity; retry shortly") from None
            if isinstance(failure, asyncio.TimeoutError):
                raise Failure(504, f"the request took longer than {self.limits.request_timeout_s} s "
                                   f"(limits.request_timeout_s); it was stopped", retry=False) from None
            if isinstance(failure, _REPLICA_LOST):
                raise Failure(503, "a model replica died while serving this request; Serve is replacing it, "
                                   "retry shortly") from None
            raise

    async def _generate(self, model: ServedModel, prompt=None, messages=None, **sampling) -> dict:
        handle = self.policy.options(multiplexed_model_id=model.model_id)
        result = await self._call(handle.complete.remote(prompt, messages, sampling))
        if "error" in result:
            raise Failure(400, result["error"], result["param"])
        return result

    async def _stream(self, model: ServedModel, prompt, messages, sampling: dict, chunks: Chunks, echo: str):
        """A streamed completion: each piece is sent as the policy replica decodes it.

        The first message (the prompt accepted, or a 400) comes before the 200 goes out. When
        the client disconnects, or the request passes `limits.request_timeout_s`, the replica's
        stream is cancelled and its rows stop at the next step.
        """
        handle = self.policy.options(multiplexed_model_id=model.model_id, stream=True)
        stream = handle.complete_stream.remote(prompt, messages, sampling)
        deadline = time.monotonic() + self.limits.request_timeout_s
        first = await self._call(stream.__anext__(), cancel=stream.cancel)
        if "error" in first:
            raise Failure(400, first["error"], first["param"])
        n = sampling["n"]

        async def events():
            finished = False
            try:
                for index in range(n):
                    if chunks.chat:
                        yield chunks.choice(index, role=True)
                    if echo:
                        yield chunks.choice(index, echo)
                while True:
                    left = deadline - time.monotonic()
                    try:
                        message = await asyncio.wait_for(stream.__anext__(), timeout=max(left, 0.001))
                    except StopAsyncIteration:
                        break
                    for index, piece in message.get("pieces", ()):
                        yield chunks.choice(index, piece)
                    for index, choice in enumerate(message.get("choices", ())):
                        yield chunks.choice(index, finish=choice["finish_reason"])
                    if "choices" in message and chunks.extra:
                        tokens = sum(c["completion_tokens"] for c in message["choices"])
                        yield chunks.usage({"prompt_tokens": first["prompt_tokens"], "completion_tokens": tokens,
                                            "total_tokens": first["prompt_tokens"] + tokens})
                finished = True
                yield "data: [DONE]\n\n"
            except asyncio.TimeoutError:
                yield chunks.error(f"the request took longer than {self.limits.request_timeout_s} s", 504)
            except _REPLICA_LOST:
                yield chunks.error("a model replica died while serving this request", 503)
            except Exception as failure:  # noqa: BLE001 (the 200 is out: the client learns it from the stream)
                logger.exception("a streamed completion failed")
                yield chunks.error(f"internal server error ({type(failure).__name__}); the server log has "
                                   f"the details", 500)
            finally:
                if not finished:  # a timeout, an error, or a client that went away
                    stream.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _score(self, model: ServedModel, prompts: list[str], responses: list[str]) -> list[float]:
        return await self._call(self.reward.score.remote(model.model_id, prompts, responses))

    # -- routes

    @app.get("/health")
    async def health(self) -> dict:
        rewards, policies = await asyncio.gather(self._call(self.reward.batch_stats.remote()),
                                                 self._call(self.policy.batch_stats.remote()))
        return {"status": "ok", "models": len(self.catalog), "reward_batches": rewards, "policy_batches": policies}

    @staticmethod
    def _model_card(model: ServedModel) -> dict:
        return {"id": model.model_id, "object": "model", "created": model.created, "owned_by": "slmrl-ray",
                "max_model_len": model.max_model_len, "provenance": model.provenance}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card(m) for m in self.catalog.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict:
        if model_id not in self.catalog:
            raise Failure(404, f"model {model_id!r} is not served", "model")
        return self._model_card(self.catalog[model_id])

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self._completion(body, prompt=body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        messages = [m.model_dump() for m in body.messages]
        return await self._completion(body, messages=messages, chat=True)

    async def _completion(self, body, chat: bool, prompt=None, messages=None):
        model = self._policy(body.model)
        unsupported = body.unsupported()
        if unsupported is not None:
            raise Failure(400, f"{unsupported}: not supported by this server", unsupported)
        if body.stream_options is not None and not body.stream:
            raise Failure(400, "stream_options: only allowed when stream is true", "stream_options")
        top_logprobs = body.top_logprobs_asked()
        if chat and body.top_logprobs is not None and not body.logprobs:
            raise Failure(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        if top_logprobs is not None and body.stream:
            raise Failure(400, "logprobs: not supported with stream", "logprobs")
        echo = prompt if not chat and body.echo else ""
        asked, field = body.asked_tokens()
        max_tokens = self._max_tokens(asked, self.limits.max_tokens if chat else 16)
        if max_tokens == 0 and not echo:
            raise Failure(400, f"{field}: 0 generates nothing; it needs echo: true (completions), to score the "
                               f"prompt", field)
        if max_tokens == 0 and body.stream:
            raise Failure(400, f"{field}: 0 (echo the prompt, generate nothing) is not streamed; send it "
                               f"without stream", field)
        self._check_limits(max_tokens, body.n, field)
        sampling = dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, n=body.n,
                        stop=body.stops(), seed=body.seed, presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty, logprobs=top_logprobs,
                        score_prompt=bool(echo) and top_logprobs is not None)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model.model_id}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await self._stream(model, prompt, messages, sampling, Chunks(meta, chat, include_usage), echo)
        result = await self._generate(model, prompt, messages, **sampling)
        completion_tokens = sum(len(c["token_ids"]) for c in result["choices"])
        usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": completion_tokens,
                 "total_tokens": result["prompt_tokens"] + completion_tokens}
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice_body(i, c, chat, echo) for i, c in enumerate(result["choices"])],
            "usage": usage,
            "provenance": model.provenance,
        }

    @app.post("/v1/rewards")
    async def rewards(self, body: RewardsRequest) -> dict:
        model = self._reward(body.model)
        if len(body.pairs) > self.limits.max_reward_pairs:
            raise Failure(400, f"pairs: {len(body.pairs)} is over the limit of {self.limits.max_reward_pairs}", "pairs")
        scores = await self._score(model, [p.prompt for p in body.pairs], [p.response for p in body.pairs])
        return {"object": "list", "model": model.model_id, "scores": scores, "provenance": model.provenance}

    @app.post("/v1/compare")
    async def compare(self, body: CompareRequest) -> dict:
        max_tokens = self._max_tokens(body.max_tokens, 64)
        self._check_limits(max_tokens)
        reward = self._reward(body.cell)
        policies = [self._policy(f"{stage}/{body.cell}") for stage in ("sft", "ppo")]
        sampling = dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, n=1,
                        stop=(), seed=body.seed)
        results = await asyncio.gather(*(self._generate(p, body.prompt, **sampling) for p in policies))
        texts = [r["choices"][0]["text"] for r in results]
        scores = await self._score(reward, [body.prompt] * 2, texts)
        return {
            "cell": body.cell, "prompt": body.prompt,
            "responses": {p.stage: {"text": t, "reward": s, "provenance": p.provenance}
                          for p, t, s in zip(policies, texts, scores)},
            "delta_reward": scores[1] - scores[0],
            "reward_model": reward.provenance,
        }

    @app.post("/v1/best_of_n")
    async def best_of_n(self, body: BestOfNRequest) -> dict:
        model = self._policy(body.model)
        max_tokens = self._max_tokens(body.max_tokens, 64)
        self._check_limits(max_tokens, body.n)
        reward = self._reward(model.cell)
        result = await self._generate(model, body.prompt, max_tokens=max_tokens, temperature=body.temperature,
                                      top_p=body.top_p, n=body.n, stop=(), seed=body.seed)
        texts = [c["text"] for c in result["choices"]]
        scores = await self._score(reward, [body.prompt] * len(texts), texts)
        ranked = sorted(zip(texts, scores), key=lambda pair: pair[1], reverse=True)
        return {
            "model": model.model_id,
            "best": {"text": ranked[0][0], "reward": ranked[0][1]},
            "candidates": [{"text": t, "reward": s} for t, s in ranked],
            "provenance": model.provenance, "reward_model": reward.provenance,
        }


# ---------------------------------------------------------------- the application builder


def _options(sizing: Sizing) -> dict:
    return {
        "num_replicas": sizing.num_replicas,
        "ray_actor_options": {"num_cpus": sizing.num_cpus, "num_gpus": sizing.num_gpus},
        "max_ongoing_requests": sizing.max_ongoing_requests,
        "max_queued_requests": sizing.max_queued_requests,
    }


def _ingress_options(sizing: Sizing) -> tuple[dict, int | None]:
    """The ingress's Serve options and how many requests it admits at once (`_Admission`).

    Its `max_ongoing_requests + max_queued_requests` are admitted (its handlers only await the
    model deployments, so waiting in them is the queue) and the rest get a JSON 503. Serve is
    told to route twice that to the replica and to queue, not refuse, any beyond: refusals
    are then always the app's own JSON. A negative `max_queued_requests` (Serve's "no limit")
    admits everything.
    """
    options = _options(sizing)
    if sizing.max_queued_requests < 0:
        return options, None
    admitted = sizing.max_ongoing_requests + sizing.max_queued_requests
    return {**options, "max_ongoing_requests": 2 * admitted, "max_queued_requests": -1}, admitted


def build_app(args: dict):
    """The Serve application builder (`import_path: slmrl_ray.serving.app:build_app`)."""
    parsed: ServeArgs = parse_args(dict(args))
    catalog = build_catalog(parsed)
    plain = {model_id: asdict(model) for model_id, model in catalog.items()}
    policies = {k: v for k, v in plain.items() if v["stage"] != "reward"}
    rewards = {k: v for k, v in plain.items() if v["stage"] == "reward"}
    policy = PolicyDeployment.options(**_options(parsed.policy)).bind(
        policies, parsed.device, parsed.limits.max_prompt_tokens, parsed.policy.max_models_per_replica,
        parsed.policy.max_batch_size, parsed.policy.batch_wait_timeout_s, parsed.faults.token_delay_s)
    reward = RewardDeployment.options(**_options(parsed.reward)).bind(
        rewards, parsed.device, parsed.reward.max_models_per_replica, parsed.reward.max_batch_size,
        parsed.reward.batch_wait_timeout_s)
    api_key = parsed.api_key or os.environ.get("SLMRL_RAY_API_KEY") or None
    ingress, admitted = _ingress_options(parsed.ingress)
    return Gateway.options(**ingress).bind(policy, reward, plain, asdict(parsed.limits),
                                           key_digest(api_key) if api_key else None, admitted)
