"""The Ray Serve application, started on 127.0.0.1 from the tiny runs' artifacts and driven
with the official `openai` client and plain HTTP, on the test session's Ray cluster."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

LIMITS = {"max_prompt_tokens": 64, "max_tokens": 32, "max_n": 4, "max_reward_pairs": 8,
          "max_body_bytes": 4096, "request_timeout_s": 60}
API_KEY = "test-key-0123456789"
AUTH = {"authorization": f"Bearer {API_KEY}"}  # the module's app requires it on every route but /health


@pytest.fixture(scope="module")
def runs(neox_run, llama_run):
    return {f"{config.model}/{config.corpus}": (config, paths) for config, paths, _ in (neox_run, llama_run)}


@pytest.fixture(scope="module")
def server(serve_application, runs):
    artifacts = [{"cell": cell, "stage": stage, "uri": str(paths.stage(stage))}
                 for cell, (_, paths) in runs.items() for stage in ("sft", "ppo", "reward")]
    args = {
        "artifacts": artifacts, "device": "cpu", "limits": LIMITS,
        # Two policies per replica for four policies: the multiplexing LRU has to evict.
        # Two running at once: concurrent requests batch if they reach the replica within 50 ms.
        "policy": {"num_cpus": 0.25, "max_models_per_replica": 2, "max_ongoing_requests": 2,
                   "max_queued_requests": 8, "batch_wait_timeout_s": 0.05},
        "reward": {"num_cpus": 0.25, "max_batch_size": 16, "batch_wait_timeout_s": 0.05,
                   "max_ongoing_requests": 64},
        "ingress": {"num_cpus": 0.25},
        "api_key": API_KEY,
    }
    return serve_application(args, "slmrl")


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def post(server: str, route: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"content-type": "application/json", **AUTH, **kwargs.pop("headers", {})}
    return httpx.post(f"{server}{route}", content=content, headers=headers, timeout=120, **kwargs)


def test_models_lists_every_policy_and_reward_model_with_provenance(client, runs):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {f"{stage}/{cell}" for cell in runs for stage in ("sft", "ppo", "reward")}
    config, paths = runs["pythia-70m/tinystories"]
    provenance = models["ppo/pythia-70m/tinystories"].model_extra["provenance"]
    stage = json.loads((paths.ppo / "stage.json").read_text())
    assert provenance == {"cell": "pythia-70m/tinystories", "stage": "ppo", "artifact": stage["fingerprint"]}
    # created: when the weights were written; max_model_len: the model's own context length
    weights = json.loads((paths.ppo / "model" / "config.json").read_text())
    one = client.models.retrieve("ppo/pythia-70m/tinystories")
    assert one.id == "ppo/pythia-70m/tinystories" and one.model_extra["max_model_len"] == weights["max_position_embeddings"]
    assert one.created == int((paths.ppo / "model" / "config.json").stat().st_mtime) > 1_600_000_000
    assert models["reward/pythia-70m/tinystories"].model_extra["max_model_len"] > 0
    missing = httpx.get(f"{client.base_url}models/ppo/nope/nothing", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_openai_client_completions_chat_and_streaming(client):
    completion = client.completions.create(model="ppo/pythia-70m/tinystories", prompt="Once upon a time",
                                           max_tokens=16, n=2, seed=7)
    assert len(completion.choices) == 2 and all(c.text for c in completion.choices)
    assert completion.usage.prompt_tokens > 0 and 2 <= completion.usage.completion_tokens <= 32
    assert completion.model_extra["provenance"]["stage"] == "ppo"

    chat = client.chat.completions.create(model="sft/smollm2-135m/wikitext", max_tokens=16, seed=3,
                                          messages=[{"role": "user", "content": "The river"}])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content

    # Streaming sends the same text, piece by piece, as the same request without `stream`.
    stream = client.chat.completions.create(model="sft/smollm2-135m/wikitext", max_tokens=16, seed=3,
                                            messages=[{"role": "user", "content": "The river"}], stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    # stream_options.include_usage: a last chunk with the usage, and none on the others.
    stream = client.chat.completions.create(model="sft/smollm2-135m/wikitext", max_tokens=16, seed=3,
                                            messages=[{"role": "user", "content": "The river"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens

    # max_completion_tokens is OpenAI's newer name for max_tokens; echo puts the prompt first.
    short = client.completions.create(model="ppo/pythia-70m/tinystories", prompt="Once upon a time",
                                      max_tokens=16, extra_body={"max_completion_tokens": 3}, temperature=0)
    assert short.usage.completion_tokens <= 3
    echoed = client.completions.create(model="ppo/pythia-70m/tinystories", prompt="Once upon a time",
                                       max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + short.choices[0].text


@pytest.mark.parametrize("chat", [False, True])
def test_logprobs_are_the_policys_own_log_probabilities(client, runs, chat):
    """Each returned token's log-probability and its top alternatives equal a forward pass of
    the policy over prompt + completion (the raw distribution, as vLLM returns by default)."""
    import torch

    from slmrl_ray.models import load_causal_lm, load_tokenizer

    config, paths = runs["pythia-70m/tinystories"]
    tokenizer = load_tokenizer(paths.ppo / "model")
    model = load_causal_lm(paths.ppo / "model", tokenizer).eval()
    prompt = "Once upon a time"
    if chat:
        answer = client.chat.completions.create(model="ppo/pythia-70m/tinystories", max_tokens=10, seed=4,
                                                messages=[{"role": "user", "content": prompt}],
                                                logprobs=True, top_logprobs=3)
        entries = [(e.model_extra["token_id"], e.logprob, [(t.model_extra["token_id"], t.logprob)
                                                         for t in e.top_logprobs])
                   for e in answer.choices[0].logprobs.content]
    else:
        answer = client.completions.create(model="ppo/pythia-70m/tinystories", prompt=prompt, max_tokens=10,
                                           seed=4, logprobs=3)
        logprobs = answer.choices[0].logprobs  # top alternatives keyed by their text, as OpenAI's
        entries = [(token_id, value, [(None, v) for v in top.values()])
                   for token_id, value, top in zip(logprobs.model_extra["token_ids"], logprobs.token_logprobs,
                                                   logprobs.top_logprobs)]
    assert len(entries) == answer.usage.completion_tokens > 0
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + [token_id for token_id, _, _ in entries]
    with torch.no_grad():
        forward = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for step, (token_id, value, top) in enumerate(entries):
        expected = forward[len(prompt_ids) - 1 + step]
        assert value == pytest.approx(expected[token_id].item(), abs=1e-4)
        best = expected.topk(3)
        assert all(any(abs(v - b) < 1e-4 for b in best.values.tolist()) for _, v in top) and top
        if chat:  # by id: two tokens that decode alike stay apart
            assert [i for i, _ in top] == best.indices.tolist()
            assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_with_the_policys_own_log_probabilities(client, runs):
    """lm-eval-harness's call: the prompt's tokens scored by a forward pass over it, nothing generated."""
    import torch

    from slmrl_ray.models import load_causal_lm, load_tokenizer

    config, paths = runs["pythia-70m/tinystories"]
    tokenizer = load_tokenizer(paths.ppo / "model")
    model = load_causal_lm(paths.ppo / "model", tokenizer).eval()
    prompt = "Once upon a time, a little girl named Lily"
    answer = client.completions.create(model="ppo/pythia-70m/tinystories", prompt=prompt, max_tokens=0,
                                       echo=True, logprobs=2)
    (choice,) = answer.choices
    assert choice.text == prompt and choice.finish_reason == "length" and answer.usage.completion_tokens == 0
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    logprobs = choice.logprobs
    assert logprobs.model_extra["token_ids"] == ids and answer.usage.prompt_tokens == len(ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    with torch.no_grad():
        forward = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert logprobs.token_logprobs[1:] == pytest.approx(forward[torch.arange(len(ids) - 1), ids[1:]].tolist(),
                                                        abs=1e-4)
    for position, top in enumerate(logprobs.top_logprobs[1:]):
        best = forward[position].topk(2).values.tolist()
        assert top and all(any(abs(v - b) < 1e-4 for b in best) for v in top.values())
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:k])) for k in range(len(ids))]


@pytest.mark.parametrize("cell", ["pythia-70m/tinystories", "smollm2-135m/wikitext"])
def test_greedy_serving_equals_offline_generation_token_for_token(client, runs, cell):
    from slmrl_ray.generation import SamplingSettings, decode_responses, generate
    from slmrl_ray.models import load_causal_lm, load_tokenizer

    config, paths = runs[cell]
    prompt = "Once upon a time, a little girl" if "tinystories" in cell else "The history of the city"
    tokenizer = load_tokenizer(paths.ppo / "model")
    model = load_causal_lm(paths.ppo / "model", tokenizer).eval()
    offline = generate(model, tokenizer, [prompt], SamplingSettings(24, greedy=True), 64, model.device)
    served = client.completions.create(model=f"ppo/{cell}", prompt=prompt, max_tokens=24, temperature=0)
    assert served.choices[0].text == decode_responses(tokenizer, offline)[0]
    assert served.usage.completion_tokens == int(offline.response_mask.sum())


def test_rewards_compare_and_best_of_n_agree_with_offline_scoring(server, runs):
    from slmrl_ray.models import load_reward_model, load_tokenizer
    from slmrl_ray.scoring import RewardScorer

    config, paths = runs["pythia-70m/tinystories"]
    tokenizer = load_tokenizer(paths.reward / "model")
    scorer = RewardScorer(load_reward_model(paths.reward / "model", tokenizer), tokenizer,
                          config.reward.max_length, 8, "cpu")
    pairs = [{"prompt": "Tom had a red ball.", "response": "He played with it all day and was happy."},
             {"prompt": "Tom had a red ball.", "response": "day all happy was with played"}]
    served = post(server, "/v1/rewards", {"model": "pythia-70m/tinystories", "pairs": pairs})
    assert served.status_code == 200, served.text
    offline = scorer.score([p["prompt"] for p in pairs], [p["response"] for p in pairs]).tolist()
    assert served.json()["scores"] == pytest.approx(offline, abs=1e-4)

    compared = post(server, "/v1/compare", {"cell": "pythia-70m/tinystories", "prompt": "Tom had a red ball.",
                                            "max_tokens": 16, "seed": 1}).json()
    sft, ppo = compared["responses"]["sft"], compared["responses"]["ppo"]
    assert compared["delta_reward"] == pytest.approx(ppo["reward"] - sft["reward"])
    rescored = scorer.score(["Tom had a red ball."] * 2, [sft["text"], ppo["text"]]).tolist()
    assert [sft["reward"], ppo["reward"]] == pytest.approx(rescored, abs=1e-4)

    best = post(server, "/v1/best_of_n", {"model": "sft/pythia-70m/tinystories", "prompt": "Tom had a red ball.",
                                          "n": 4, "max_tokens": 16, "seed": 5}).json()
    rewards = [c["reward"] for c in best["candidates"]]
    assert len(rewards) == 4 and rewards == sorted(rewards, reverse=True)
    assert best["best"]["reward"] == max(rewards)


def test_stop_sequences_cut_the_text(client):
    full = client.completions.create(model="sft/pythia-70m/tinystories", prompt="Once upon a time",
                                     max_tokens=32, temperature=0)
    text = full.choices[0].text
    stop = text.strip().split()[2]
    cut = client.completions.create(model="sft/pythia-70m/tinystories", prompt="Once upon a time",
                                    max_tokens=32, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    # The stop string ended generation in the engine: usage counts only the tokens returned.
    assert cut.usage.completion_tokens < full.usage.completion_tokens


@pytest.mark.parametrize(
    "route, body, status, param",
    [
        ("/v1/completions", {"model": "ppo/nope/nothing", "prompt": "hi"}, 404, "model"),
        ("/v1/completions", {"model": "../../etc/passwd", "prompt": "hi"}, 404, "model"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", "max_tokens": 33}, 400, "max_tokens"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", "n": 5}, 400, "n"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "word " * 200}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, 400, "model"),
        ("/v1/chat/completions", {"model": "sft/pythia-70m/tinystories", "messages": [{"role": "robot", "content": "x"}]},
         400, "messages.0.role"),
        ("/v1/rewards", {"model": "pythia-70m/tinystories", "pairs": [{"prompt": "a", "response": "b"}] * 9}, 400, "pairs"),
        ("/v1/rewards", {"model": "reward/unknown/cell", "pairs": [{"prompt": "a", "response": "b"}]}, 404, "model"),
        ("/v1/best_of_n", {"model": "reward/pythia-70m/tinystories", "prompt": "hi"}, 400, "model"),
        ("/v1/completions", {"model": "reward/pythia-70m/tinystories", "prompt": "hi"}, 400, "model"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", "max_completion_tokens": 33},
         400, "max_completion_tokens"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", "stream_options": {}},
         400, "stream_options"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", "echo": True, "logprobs": 1,
                             "stream": True}, 400, "logprobs"),
        ("/v1/chat/completions", {"model": "sft/pythia-70m/tinystories", "messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"model": "sft/pythia-70m/tinystories", "messages": [{"role": "user", "content": "x"}],
                                  "presence_penalty": 3}, 400, "presence_penalty"),
        *[("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "hi", field: value}, 400, field)
          for field, value in [("best_of", 3), ("logit_bias", {"50256": -100}), ("suffix", "end"),
                               ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
                               ("tool_choice", "auto"), ("functions", [{"name": "f"}])]],
    ],
)
def test_bad_requests_get_a_json_4xx_naming_the_field(server, route, body, status, param):
    response = post(server, route, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["message"]


def test_bodies_over_the_limit_and_broken_json_are_4xx(server):
    huge = post(server, "/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "x" * 5000})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
    broken = post(server, "/v1/completions", b'{"model": "ppo/pythia-70m/tinystories", "prompt": ')
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/v1/nothing-here", headers=AUTH).status_code == 404


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
_fields = st.sampled_from(["model", "prompt", "messages", "max_tokens", "n", "temperature", "top_p", "stop",
                           "seed", "stream", "pairs", "cell", "response", "logprobs", "top_logprobs", "echo",
                           "max_completion_tokens", "stream_options", "best_of", "presence_penalty", "tools",
                           "logit_bias", "response_format"])
_models = st.sampled_from(["ppo/pythia-70m/tinystories", "sft/smollm2-135m/wikitext", "pythia-70m/tinystories",
                           "reward/pythia-70m/tinystories", "", "x" * 300])
_bodies = st.one_of(
    _json_values,
    st.fixed_dictionaries({"model": _models}, optional={"prompt": _json_values, "max_tokens": _json_values,
                                                        "n": _json_values, "temperature": _json_values,
                                                        "messages": _json_values, "pairs": _json_values,
                                                        "stop": _json_values, "seed": _json_values,
                                                        "cell": _models}),
    st.dictionaries(_fields, _json_values, max_size=6),
    # Near-valid requests: every sampling field at plausible and edge values, so the engine runs.
    st.fixed_dictionaries(
        {"model": _models, "prompt": st.sampled_from(["Once upon a time", "The river", " ", "\u00e9\u00e9\u00e9"])},
        optional={"max_tokens": st.integers(-1, 40), "max_completion_tokens": st.integers(-1, 40),
                  "temperature": st.floats(-0.5, 2.5), "top_p": st.floats(-0.1, 1.1), "n": st.integers(0, 5),
                  "seed": st.integers(-1, 2**64), "stream": st.booleans(), "echo": st.booleans(),
                  "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
                  "logprobs": st.one_of(st.booleans(), st.integers(-1, 21)), "top_logprobs": st.integers(-1, 21),
                  "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
                  "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5)),
                  "best_of": st.integers(0, 3),
                  "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                              "content": st.text(max_size=20)}), max_size=3)}),
)


_cases = st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/rewards", "/v1/compare",
                                     "/v1/best_of_n", "/v1/models", "/v1/models/x", "/health"]),
                   _bodies, st.booleans(), st.binary(max_size=40))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=st.lists(_cases, min_size=10, max_size=10))
@example(cases=[("/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "Once upon a time",  # CI found it
                                     "temperature": 2.2250738585072014e-308}, False, b"")] * 10)
def test_malformed_requests_never_get_a_5xx(server, cases):
    """2,000 cases (200 examples of 10, sent 3 at a time: within the policy replica's queue,
    so a 503 would be a real failure, not overload) across every route."""
    async def send():
        gate = asyncio.Semaphore(3)
        async with httpx.AsyncClient(timeout=120, headers={"content-type": "application/json", **AUTH}) as session:
            async def one(route, body, raw, junk):
                payload = junk if raw else json.dumps(body, allow_nan=True)
                async with gate:
                    if route in ("/v1/models", "/v1/models/x", "/health"):
                        return route, payload, await session.get(f"{server}{route}")
                    return route, payload, await session.post(f"{server}{route}", content=payload)
            return await asyncio.gather(*(one(*case) for case in cases))

    for route, payload, response in asyncio.run(send()):
        assert response.status_code < 500, (route, payload, response.status_code, response.text)
        if response.status_code >= 400:
            assert response.json()["error"]["message"]
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            # A stream's 200 goes out first: a failure after it is an error event, as bad as a 5xx.
            events = [json.loads(line[6:]) for line in response.text.splitlines()
                      if line.startswith("data: {")]
            assert not any("error" in event for event in events), (route, payload, response.text)
            assert response.text.endswith("data: [DONE]\n\n"), (route, payload, response.text)


def test_concurrent_reward_requests_are_batched(server):
    async def burst():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as session:
            body = {"model": "reward/smollm2-135m/wikitext", "pairs": [{"prompt": "The city", "response": "is old."}]}
            return await asyncio.gather(*(session.post(f"{server}/v1/rewards", json=body) for _ in range(24)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert len({round(r.json()["scores"][0], 5) for r in responses}) == 1  # same pair, same score
    assert httpx.get(f"{server}/health").json()["reward_batches"]["max_batch_size"] > 1


def test_concurrent_completions_share_a_generate_call_and_greedy_output_is_unchanged(server, client):
    alone = client.completions.create(model="sft/smollm2-135m/wikitext", prompt="The history of",
                                      max_tokens=12, temperature=0).choices[0].text

    async def together():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as session:
            # Different lengths, temperatures and penalties: still one generate call.
            bodies = [{"model": "sft/smollm2-135m/wikitext", "prompt": "The history of", "max_tokens": 12,
                       "temperature": 0},
                      {"model": "sft/smollm2-135m/wikitext", "prompt": "The river", "max_tokens": 5,
                       "temperature": 0.7, "top_p": 0.9, "seed": 1},
                      {"model": "sft/smollm2-135m/wikitext", "prompt": "The history of", "max_tokens": 12,
                       "temperature": 0},
                      {"model": "sft/smollm2-135m/wikitext", "prompt": "In 1990 the", "max_tokens": 8,
                       "temperature": 1.0, "frequency_penalty": 0.5}]
            return await asyncio.gather(*(session.post(f"{server}/v1/completions", json=b) for b in bodies))

    before = httpx.get(f"{server}/health").json()["policy_batches"]["batches"]
    responses = asyncio.run(together())
    texts = [r.json()["choices"][0]["text"] for r in responses]
    assert texts[0] == texts[2] == alone  # left-padded in a batch, greedy decodes as alone
    assert [r.json()["usage"]["completion_tokens"] <= cap for r, cap in zip(responses, (12, 5, 12, 8))] == [True] * 4
    stats = httpx.get(f"{server}/health").json()["policy_batches"]
    assert stats["max_batch_size"] > 1 and stats["batches"] - before < 4


def test_concurrent_seeded_requests_equal_the_same_requests_one_by_one(server):
    """A request's seed alone decides its sample: alone, or batched with other seeded and
    unseeded requests, and across /v1/completions, /v1/compare and /v1/best_of_n."""
    completion = lambda seed, n=1: ("/v1/completions", {  # noqa: E731
        "model": "ppo/pythia-70m/tinystories", "prompt": "Once upon a time", "max_tokens": 12,
        "temperature": 1.0, "n": n, **({} if seed is None else {"seed": seed})})
    seeded = [completion(1), completion(2, n=2), ("/v1/compare", {"cell": "pythia-70m/tinystories",
              "prompt": "Tom had a red ball.", "max_tokens": 10, "seed": 5}),
              ("/v1/best_of_n", {"model": "sft/pythia-70m/tinystories", "prompt": "Tom had a red ball.",
                                 "n": 2, "max_tokens": 10, "seed": 9})]

    def outcome(route: str, answer: dict):
        if route == "/v1/completions":
            return [c["text"] for c in answer["choices"]]
        if route == "/v1/compare":
            return [answer["responses"][stage]["text"] for stage in ("sft", "ppo")]
        return [c["text"] for c in answer["candidates"]]

    one_by_one = [outcome(route, post(server, route, body).json()) for route, body in seeded]

    async def together():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as session:
            # Six generations at once (compare makes two), with unseeded company: within what the
            # module's policy replica takes (2 running + 8 queued: a fresh-clone run once found
            # 2 + 4 full) without a 503.
            calls = [*seeded, completion(None)]
            return calls, await asyncio.gather(*(session.post(f"{server}{r}", json=b) for r, b in calls))

    before = httpx.get(f"{server}/health").json()["policy_batches"]["batches"]
    calls, responses = asyncio.run(together())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    answers = [outcome(route, r.json()) for (route, _), r in zip(calls, responses)]
    assert answers[:4] == one_by_one
    assert httpx.get(f"{server}/health").json()["policy_batches"]["batches"] - before < 6  # seeded ones batch too
    route, body = completion(3)
    assert outcome(route, post(server, route, body).json()) != one_by_one[0]  # the seed decides


def test_without_the_api_key_every_route_but_health_is_a_401(server):
    routes = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/rewards"), ("POST", "/v1/compare"), ("POST", "/v1/best_of_n"), ("GET", "/nothing")]
    for headers in ({}, {"authorization": "Bearer wrong-key"}, {"authorization": API_KEY}):
        for method, route in routes:
            response = httpx.request(method, f"{server}{route}", json={}, headers=headers, timeout=60)
            assert response.status_code == 401, (route, headers, response.text)
            assert response.json()["error"]["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/health", timeout=60).status_code == 200


def test_an_unexpected_exception_in_a_handler_is_a_json_500():
    from fastapi.testclient import TestClient

    from slmrl_ray.serving.app import app

    def broken():
        raise KeyError("a bug")

    app.add_api_route("/test-broken", broken)
    try:
        response = TestClient(app, raise_server_exceptions=False).get("/test-broken")
    finally:
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/test-broken"]
    assert response.status_code == 500
    assert response.json()["error"] == {"message": "internal server error (KeyError); the server log has the details",
                                        "type": "server_error", "param": None, "code": 500}


def test_overload_is_a_503_never_a_500(server):
    async def flood():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as session:
            body = {"model": "ppo/pythia-70m/tinystories", "prompt": "Once upon a time", "max_tokens": 32}
            return await asyncio.gather(*(session.post(f"{server}/v1/completions", json=body) for _ in range(24)))

    codes = [r.status_code for r in asyncio.run(flood())]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes


def test_a_killed_policy_replica_is_replaced_and_serving_continues(server, client):
    import ray

    def replicas() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if "slmrl#PolicyDeployment" in a["name"]}

    before = replicas()
    assert len(before) == 1
    ray.kill(ray.get_actor(next(iter(before)), namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not replicas() or replicas() == before):
        time.sleep(1)
    assert replicas() and replicas() != before
    failures = []
    for _ in range(60):  # the proxy may route to the dead replica once before it learns
        response = post(server, "/v1/completions", {"model": "ppo/pythia-70m/tinystories",
                                                    "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        if response.status_code == 200:
            break
        failures.append(response)
        time.sleep(2)
    assert response.json()["choices"][0]["text"]
    for failure in failures:  # while it was being replaced: JSON errors, 503s (retry), never a bare 500
        assert failure.status_code == 503 and failure.json()["error"]["message"], failure.text


# ---------------------------------------------------------------- streaming, cancellation, timeouts
# On an application whose generation is slowed to 0.1 s a step (`faults.token_delay_s`), so
# that when a token is made is measurable: the tiny models decode a token in milliseconds.

DELAY = 0.1


@pytest.fixture(scope="module")
def slow(serve_application, runs):
    from ray import serve

    _, paths = runs["pythia-70m/tinystories"]
    args = {
        "artifacts": [{"cell": "pythia-70m/tinystories", "stage": stage, "uri": str(paths.stage(stage))}
                      for stage in ("sft", "ppo", "reward")],
        "device": "cpu", "limits": {**LIMITS, "request_timeout_s": 2.0},
        "policy": {"num_cpus": 0.25}, "reward": {"num_cpus": 0.25},
        "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 2, "max_queued_requests": 2},  # admits 4
        "faults": {"token_delay_s": DELAY},
    }
    url = serve_application(args, "slow", "/slow")
    post(url, "/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "Hi", "max_tokens": 1})  # load it
    yield url
    serve.delete("slow")


def tokens_generated(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=60).json()["policy_batches"]["tokens_generated"]


def test_a_stream_sends_each_piece_as_it_is_generated(slow):
    from openai import OpenAI

    client = OpenAI(base_url=f"{slow}/v1", api_key="unused", max_retries=0)
    started = time.perf_counter()
    arrivals, pieces = [], []
    for chunk in client.completions.create(model="ppo/pythia-70m/tinystories", prompt="Once upon a time",
                                           max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter() - started)
            pieces.append(chunk.choices[0].text)
        usage = chunk.usage
    total = time.perf_counter() - started
    tokens = usage.completion_tokens
    assert tokens >= 6, tokens  # (greedy: this prompt does not end early)
    assert arrivals[0] < total / 3 and total >= tokens * DELAY  # the first piece long before the last token
    assert arrivals[-1] - arrivals[0] >= (tokens - 2) * DELAY * 0.8  # the pieces came spread out, as made
    plain = client.completions.create(model="ppo/pythia-70m/tinystories", prompt="Once upon a time", max_tokens=12,
                                      temperature=0)
    assert "".join(pieces) == plain.choices[0].text


def test_a_client_that_disconnects_mid_stream_stops_its_generation(slow):
    before = tokens_generated(slow)
    body = {"model": "ppo/pythia-70m/tinystories", "prompt": "Once upon a time", "max_tokens": 32,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{slow}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # one piece, then the client goes away
    time.sleep(1.0)
    stopped_at = tokens_generated(slow)
    time.sleep(1.0)
    assert tokens_generated(slow) == stopped_at  # nothing runs on
    assert stopped_at - before < 16, stopped_at - before  # well short of the 32 it asked for


def test_a_request_past_the_time_limit_is_stopped_and_says_not_to_retry(slow):
    from openai import APIStatusError, OpenAI

    before = tokens_generated(slow)
    response = post(slow, "/v1/completions", {"model": "ppo/pythia-70m/tinystories", "prompt": "Once upon a time",
                                              "max_tokens": 32, "temperature": 0})  # 3.2 s of work, 2 s allowed
    assert response.status_code == 504 and response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["type"] == "timeout"
    time.sleep(1.0)
    stopped_at = tokens_generated(slow)
    time.sleep(1.0)
    assert tokens_generated(slow) == stopped_at and stopped_at - before < 32
    # The openai client honours it: one attempt, though it would retry a 5xx twice.
    client = OpenAI(base_url=f"{slow}/v1", api_key="unused", max_retries=2)
    started = time.perf_counter()
    with pytest.raises(APIStatusError) as raised:
        client.completions.create(model="ppo/pythia-70m/tinystories", prompt="Once upon a time", max_tokens=32,
                                  temperature=0)
    assert raised.value.status_code == 504 and time.perf_counter() - started < 4.0


def test_a_full_ingress_is_the_apps_json_503_not_serves_text(slow):
    """Serve's proxy answers a full ingress queue itself, in text/plain: the app admits its
    ingress's 2 running + 2 queued and refuses the rest in JSON before Serve would."""
    async def flood():
        async with httpx.AsyncClient(timeout=60) as session:
            body = {"model": "ppo/pythia-70m/tinystories", "prompt": "Once upon a time", "max_tokens": 8,
                    "temperature": 0}
            return await asyncio.gather(*(session.post(f"{slow}/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(flood())
    refused = [r for r in responses if r.status_code != 200]
    assert refused and len(refused) < len(responses), [r.status_code for r in responses]
    for response in refused:
        assert response.status_code == 503 and response.headers["content-type"] == "application/json", response.text
        assert response.json()["error"]["type"] == "overloaded" and response.headers["retry-after"] == "1"
