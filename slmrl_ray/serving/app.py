"""The Ray Serve application: one deployment graph for every policy and reward model.

    serve run serve_configs/tiny.yaml            # a Serve config whose import_path is build_app
    slmrl-ray serve ~/slmrl_ray_results/tiny-grid  # the same, from a registry, on 127.0.0.1

Three deployments:
- `PolicyDeployment` hosts the SFT and PPO policies of many cells with Serve's model
  multiplexing (`ppo/pythia-70m/tinystories` is a multiplexed model id; each replica keeps
  an LRU of `policy.max_models_per_replica` loaded policies, and Serve routes a request to a
  replica that already holds its model), and batches concurrent requests into one
  `generate` call (`@serve.batch`);
- `RewardDeployment` scores (prompt, response) pairs with `@serve.batch`, so pairs from
  concurrent requests share forward passes;
- `Gateway`, the FastAPI ingress, validates requests, applies the limits and composes the
  other two through deployment handles: `/v1/models`, `/v1/completions`,
  `/v1/chat/completions` (with `stream`), `/v1/rewards`, `/v1/compare`, `/v1/best_of_n`,
  `/health`. Every answer names its provenance (cell, stage, artifact fingerprint).

Errors are JSON in OpenAI's shape: a bad field is a 400 naming it, an unknown model a 404,
a body over the limit a 413, an overloaded deployment (its queue full), a replica that died
mid-request or a request over the time limit a 503, anything unexpected a 500. With an API
key (`api_key`, or $SLMRL_RAY_API_KEY where the app is built), every route but /health
needs `Authorization: Bearer <key>`, else a 401. Streaming sends the choices as server-sent events, token by token,
once generation has finished (the generation path is the batched one that PPO and
evaluation use, not a token-by-token loop).
"""

import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slmrl_ray.serving.api import (
    BestOfNRequest,
    ChatCompletionRequest,
    CompareRequest,
    CompletionRequest,
    RewardsRequest,
    error,
    validation_error,
)
from slmrl_ray.serving.config import Limits, ServedModel, ServeArgs, Sizing, build_catalog, parse_args

app = FastAPI(title="slmrl-ray", description="SFT and PPO policies and reward models of slmrl-ray runs")


class Failure(Exception):
    """An error answer decided inside a handler: status, message, field."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    return validation_error(exc.errors())


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail), kind="not_found" if exc.status_code == 404 else "invalid_request_error")


@app.exception_handler(Failure)
async def _failure(request: Request, exc: Failure):
    kind = {404: "not_found", 503: "overloaded"}.get(exc.status, "invalid_request_error")
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return error(exc.status, str(exc), exc.param, kind, headers)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    """Anything a handler did not expect: still OpenAI's JSON shape (Starlette logs the traceback)."""
    return error(500, f"internal server error ({type(exc).__name__}); the server log has the details",
                 kind="server_error")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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


# ---------------------------------------------------------------- model deployments


@serve.deployment
class PolicyDeployment:
    """Generates from multiplexed policies; the model id comes with each request.

    Requests for the same policy and the same max_tokens/temperature/top_p that arrive
    together share one `generate` call (`@serve.batch`); a seeded request draws from a
    generator of its own there, so its seed alone decides its sample.
    """

    def __init__(self, models: dict[str, dict], device: str, max_prompt_tokens: int, max_models: int,
                 max_batch_size: int, batch_wait_timeout_s: float) -> None:
        from slmrl_ray.serving.runners import PolicyRunner

        catalog = {model_id: ServedModel(**fields) for model_id, fields in models.items()}

        async def load(model_id: str):  # a plain function: Serve keeps its LRU on it
            return await asyncio.to_thread(PolicyRunner, catalog[model_id], device, max_prompt_tokens)

        self.batch_sizes: list[int] = []

        async def generate_batch(items: list[tuple]) -> list[tuple]:
            self.batch_sizes.append(len(items))
            groups: dict[tuple, list[int]] = {}
            for index, (runner, _, sampling) in enumerate(items):
                key = (id(runner), sampling.max_tokens, sampling.temperature, sampling.top_p)
                groups.setdefault(key, []).append(index)
            results: dict[int, tuple] = {}
            for rows in groups.values():
                runner = items[rows[0]][0]
                outputs = await asyncio.to_thread(runner.complete_batch, [items[i][1:] for i in rows])
                results.update(zip(rows, outputs))
            return [results[i] for i in range(len(items))]

        self._runner = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        self._generate = serve.batch(max_batch_size=max_batch_size,
                                     batch_wait_timeout_s=batch_wait_timeout_s)(generate_batch)

    async def complete(self, prompt: str | None, messages: list[dict] | None, sampling: dict) -> dict:
        from slmrl_ray.serving.runners import RequestError, Sampling

        runner = await self._runner(serve.get_multiplexed_model_id())
        sampling = Sampling(**sampling)
        try:
            text = prompt if messages is None else runner.format_chat(messages)
            runner.check_prompt(text)
            choices, prompt_tokens = await self._generate((runner, text, sampling))
        except RequestError as failure:
            return {"error": str(failure), "param": failure.param}
        return {"choices": [asdict(c) for c in choices], "prompt_tokens": prompt_tokens}

    def batch_stats(self) -> dict:
        return _batch_stats(self.batch_sizes)


@serve.deployment
class RewardDeployment:
    """Scores pairs; pairs of concurrent requests are batched (`@serve.batch`) per reward model."""

    def __init__(self, models: dict[str, dict], device: str, max_models: int, max_batch_size: int,
                 batch_wait_timeout_s: float) -> None:
        from slmrl_ray.serving.runners import RewardRunner

        catalog = {model_id: ServedModel(**fields) for model_id, fields in models.items()}
        runners: OrderedDict = OrderedDict()
        self.batch_sizes: list[int] = []

        def runner_for(model_id: str) -> RewardRunner:
            if model_id not in runners:
                if len(runners) >= max_models:
                    runners.popitem(last=False)
                runners[model_id] = RewardRunner(catalog[model_id], device, max_batch_size)
            runners.move_to_end(model_id)
            return runners[model_id]

        async def score_batch(items: list[tuple[str, str, str]]) -> list[float]:
            self.batch_sizes.append(len(items))
            scores: dict[int, float] = {}
            for model_id in dict.fromkeys(item[0] for item in items):
                rows = [i for i, item in enumerate(items) if item[0] == model_id]
                runner = await asyncio.to_thread(runner_for, model_id)
                values = await asyncio.to_thread(
                    runner.score, [items[i][1] for i in rows], [items[i][2] for i in rows])
                scores.update(zip(rows, values))
            return [scores[i] for i in range(len(items))]

        self._score_one = serve.batch(max_batch_size=max_batch_size,
                                      batch_wait_timeout_s=batch_wait_timeout_s)(score_batch)

    async def score(self, model_id: str, prompts: list[str], responses: list[str]) -> list[float]:
        return list(await asyncio.gather(*(self._score_one((model_id, p, r)) for p, r in zip(prompts, responses))))

    def batch_stats(self) -> dict:
        return _batch_stats(self.batch_sizes)


def _batch_stats(sizes: list[int]) -> dict:
    """How full `@serve.batch` batches were (this replica): count and largest."""
    return {"batches": len(sizes), "max_batch_size": max(sizes, default=0)}


# ---------------------------------------------------------------- the ingress


# Defined before `Gateway`: `serve.ingress` serialises the app when the class is decorated.
def _choice(index: int, choice: dict, chat: bool) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": choice["text"]},
                "finish_reason": choice["finish_reason"]}
    return {"index": index, "text": choice["text"], "finish_reason": choice["finish_reason"], "logprobs": None}


async def _sse(choices: list[dict], meta: dict, chat: bool):
    """Server-sent events in OpenAI's streaming format, ending with `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': [choice]})}\n\n"

    for index, choice in enumerate(choices):
        if chat:
            yield event(index, None, None, role=True)
        for piece in choice["pieces"]:
            yield event(index, piece, None)
        yield event(index, None, choice["finish_reason"])
    yield "data: [DONE]\n\n"


@serve.deployment
@serve.ingress(app)
class Gateway:
    def __init__(self, policy, reward, models: dict[str, dict], limits: dict, api_key_digest: str | None = None) -> None:
        self.policy, self.reward = policy, reward
        self.catalog = {model_id: ServedModel(**fields) for model_id, fields in models.items()}
        self.limits = Limits(**limits)
        app.state.max_body_bytes = self.limits.max_body_bytes
        app.state.api_key_digest = api_key_digest

    # -- helpers

    def _policy(self, model_id: str) -> ServedModel:
        model = self.catalog.get(model_id)
        if model is None or model.stage == "reward":
            known = ", ".join(sorted(m for m, s in self.catalog.items() if s.stage != "reward"))
            raise Failure(404, f"model {model_id!r} is not served (policies: {known})", "model")
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

    def _check_limits(self, max_tokens: int, n: int = 1) -> None:
        if max_tokens > self.limits.max_tokens:
            raise Failure(400, f"max_tokens: {max_tokens} is over the limit of {self.limits.max_tokens}", "max_tokens")
        if n > self.limits.max_n:
            raise Failure(400, f"n: {n} is over the limit of {self.limits.max_n}", "n")

    async def _call(self, response):
        """Await a deployment call under the request time limit; overload is a 503."""
        try:
            return await asyncio.wait_for(response, timeout=self.limits.request_timeout_s)
        except BackPressureError:
            raise Failure(503, "the server is at capacity; retry shortly") from None
        except asyncio.TimeoutError:
            raise Failure(503, f"the request took longer than {self.limits.request_timeout_s} s") from None
        except RayActorError:
            raise Failure(503, "a model replica died while serving this request; Serve is replacing it, "
                               "retry shortly") from None

    async def _generate(self, model: ServedModel, prompt=None, messages=None, **sampling) -> dict:
        handle = self.policy.options(multiplexed_model_id=model.model_id)
        result = await self._call(handle.complete.remote(prompt, messages, sampling))
        if "error" in result:
            raise Failure(400, result["error"], result["param"])
        return result

    async def _score(self, model: ServedModel, prompts: list[str], responses: list[str]) -> list[float]:
        return await self._call(self.reward.score.remote(model.model_id, prompts, responses))

    # -- routes

    @app.get("/health")
    async def health(self) -> dict:
        rewards, policies = await asyncio.gather(self._call(self.reward.batch_stats.remote()),
                                                 self._call(self.policy.batch_stats.remote()))
        return {"status": "ok", "models": len(self.catalog), "reward_batches": rewards, "policy_batches": policies}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": m.model_id, "object": "model", "owned_by": "slmrl-ray", "provenance": m.provenance}
            for m in self.catalog.values()
        ]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self._completion(body, prompt=body.prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        messages = [m.model_dump() for m in body.messages]
        return await self._completion(body, messages=messages, chat=True)

    async def _completion(self, body, chat: bool, prompt=None, messages=None):
        model = self._policy(body.model)
        max_tokens = self._max_tokens(body.max_tokens, self.limits.max_tokens if chat else 16)
        self._check_limits(max_tokens, body.n)
        result = await self._generate(model, prompt, messages, max_tokens=max_tokens,
                                      temperature=body.temperature, top_p=body.top_p, n=body.n,
                                      stop=body.stops(), seed=body.seed)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model.model_id}
        if body.stream:
            return StreamingResponse(_sse(result["choices"], meta, chat), media_type="text/event-stream")
        completion_tokens = sum(len(c["token_ids"]) for c in result["choices"])
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [_choice(i, c, chat) for i, c in enumerate(result["choices"])],
            "usage": {"prompt_tokens": result["prompt_tokens"], "completion_tokens": completion_tokens,
                      "total_tokens": result["prompt_tokens"] + completion_tokens},
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


def build_app(args: dict):
    """The Serve application builder (`import_path: slmrl_ray.serving.app:build_app`)."""
    parsed: ServeArgs = parse_args(dict(args))
    catalog = build_catalog(parsed)
    plain = {model_id: asdict(model) for model_id, model in catalog.items()}
    policies = {k: v for k, v in plain.items() if v["stage"] != "reward"}
    rewards = {k: v for k, v in plain.items() if v["stage"] == "reward"}
    policy = PolicyDeployment.options(**_options(parsed.policy)).bind(
        policies, parsed.device, parsed.limits.max_prompt_tokens, parsed.policy.max_models_per_replica,
        parsed.policy.max_batch_size, parsed.policy.batch_wait_timeout_s)
    reward = RewardDeployment.options(**_options(parsed.reward)).bind(
        rewards, parsed.device, parsed.reward.max_models_per_replica, parsed.reward.max_batch_size,
        parsed.reward.batch_wait_timeout_s)
    api_key = parsed.api_key or os.environ.get("SLMRL_RAY_API_KEY") or None
    return Gateway.options(**_options(parsed.ingress)).bind(policy, reward, plain, asdict(parsed.limits),
                                                            key_digest(api_key) if api_key else None)
