"""The ingress's error answers for failures of the deployments behind it: fast, no Ray session.

The gateway's helpers run on stand-ins for Serve's deployment handles, so a replica that is
lost, or a stream that breaks after its 200 went out, is staged exactly.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from slmrl_ray.serving.api import Chunks
from slmrl_ray.serving.app import Failure, Gateway
from slmrl_ray.serving.config import Limits


class FakeStream:
    """A deployment's response stream: `messages`, then `failure` raised (if any)."""

    def __init__(self, messages: list[dict], failure: BaseException | None = None) -> None:
        self.messages, self.failure, self.cancelled = list(messages), failure, False

    async def __anext__(self) -> dict:
        if self.messages:
            return self.messages.pop(0)
        if self.failure is not None:
            raise self.failure
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakePolicy:
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.complete_stream = self

    def options(self, **_) -> "FakePolicy":
        return self

    def remote(self, *_) -> FakeStream:
        return self.stream


# The class as written, under Serve's ASGI wrapper (whose finaliser wants a running replica).
_GATEWAY = next(c for c in Gateway.func_or_class.__mro__ if "ASGI" not in c.__name__ and "_call" in vars(c))


def gateway(policy=None):
    """A gateway object without Serve: only what `_call` and `_stream` use."""
    instance = object.__new__(_GATEWAY)
    instance.policy, instance.limits = policy, Limits(request_timeout_s=5.0)
    return instance


async def _raises(failure: BaseException):
    raise failure


@pytest.mark.parametrize("failure", [
    ActorDiedError(), ActorUnavailableError("unreachable", None), ReplicaUnavailableError("replica-1"),
    DeploymentUnavailableError("PolicyDeployment"), BackPressureError(8, 8),
], ids=lambda f: type(f).__name__)
def test_a_lost_replica_or_an_overloaded_deployment_is_a_503(failure):
    with pytest.raises(Failure) as raised:
        asyncio.run(gateway()._call(_raises(failure)))
    assert raised.value.status == 503 and raised.value.retry


def test_a_stream_that_breaks_after_its_200_ends_with_an_error_event_the_openai_client_raises():
    from openai import APIError, OpenAI


    stream = FakeStream([{"prompt_tokens": 3}, {"pieces": [[0, "Once"]]}], RuntimeError("a bug in the engine"))
    meta = {"id": "cmpl-1", "created": 0, "model": "ppo/a/b"}
    sampling = {"n": 1}

    async def run() -> list[str]:
        response = await gateway(FakePolicy(stream))._stream(
            type("Model", (), {"model_id": "ppo/a/b"})(), "Once", None, sampling, Chunks(meta, False, False), "")
        return [event async for event in response.body_iterator]

    events = asyncio.run(run())
    assert json.loads(events[0][6:])["choices"][0]["text"] == "Once"
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == 500 and "RuntimeError" in error["message"] and "a bug" not in error["message"]
    assert "data: [DONE]\n\n" not in events and stream.cancelled  # the replica's rows stop

    # What a client sees: the pieces sent, then the error raised from the stream.
    body = "".join(events).encode()
    transport = httpx.MockTransport(lambda request: httpx.Response(
        200, content=body, headers={"content-type": "text/event-stream"}))
    client = OpenAI(base_url="http://test/v1", api_key="k", http_client=httpx.Client(transport=transport))
    received = []
    with pytest.raises(APIError, match="internal server error"):
        for chunk in client.completions.create(model="ppo/a/b", prompt="Once", stream=True):
            received.append(chunk.choices[0].text)
    assert received == ["Once"]


@pytest.mark.parametrize("failure", [ActorDiedError(), ReplicaUnavailableError("replica-1")],
                         ids=lambda f: type(f).__name__)
def test_a_replica_lost_mid_stream_is_a_503_error_event(failure):
    stream = FakeStream([{"prompt_tokens": 3}], failure)

    async def run() -> list[str]:
        response = await gateway(FakePolicy(stream))._stream(
            type("Model", (), {"model_id": "ppo/a/b"})(), None, [{"role": "user", "content": "hi"}], {"n": 1},
            Chunks({"id": "c", "created": 0, "model": "ppo/a/b"}, True, False), "")
        return [event async for event in response.body_iterator]

    events = asyncio.run(run())
    assert json.loads(events[-1][6:])["error"]["code"] == 503 and stream.cancelled


def test_the_ingress_refuses_what_it_cannot_admit_in_json_so_serves_proxy_never_has_to():
    """Serve's proxy answers a full ingress queue itself, in text/plain: the app admits its
    `max_ongoing_requests + max_queued_requests` (a stream until its last byte) and answers the
    rest with a JSON 503, and Serve is set to route twice that to it and to queue the rest."""
    from fastapi.responses import StreamingResponse

    from slmrl_ray.serving.app import _ingress_options, app
    from slmrl_ray.serving.config import Sizing

    options, admitted = _ingress_options(Sizing(max_ongoing_requests=3, max_queued_requests=5))
    assert admitted == 8 and options["max_ongoing_requests"] == 16 and options["max_queued_requests"] == -1
    assert _ingress_options(Sizing(max_queued_requests=-1))[1] is None  # Serve's "no limit": admit all

    gate = {}  # this run's event (one event loop per asyncio.run)

    async def held():
        await gate["release"].wait()
        return {"ok": True}

    async def streamed():
        async def pieces():
            yield "data: 1\n\n"
            await gate["release"].wait()
            yield "data: [DONE]\n\n"
        return StreamingResponse(pieces(), media_type="text/event-stream")

    async def run(path: str):
        release = gate["release"] = asyncio.Event()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as session:
            first = asyncio.create_task(session.get(path))
            await asyncio.sleep(0.2)  # the first is in (for a stream: its first piece is out)
            refused = await asyncio.wait_for(session.get(path), 10)  # (admitted, it would wait on the first)
            release.set()
            answered = await first
            release.clear()
            asyncio.get_running_loop().call_later(0.1, release.set)
            after = await session.get(path)  # the slot came back
            return refused, answered, after

    saved = dict(vars(app.state)["_state"])
    app.add_api_route("/test-held", held)
    app.add_api_route("/test-streamed", streamed)
    try:
        app.state.max_admitted, app.state.api_key_digest, app.state.max_body_bytes = 1, None, None
        for path in ("/test-held", "/test-streamed"):
            refused, answered, after = asyncio.run(run(path))
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", (path, refused.text)
            assert refused.json()["error"]["type"] == "overloaded"
            assert answered.status_code == after.status_code == 200, path
    finally:
        app.router.routes = [r for r in app.router.routes if not getattr(r, "path", "").startswith("/test-")]
        vars(app.state)["_state"].clear()
        vars(app.state)["_state"].update(saved)
