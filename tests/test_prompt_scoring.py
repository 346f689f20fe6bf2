"""Prompt scoring (`/v1/completions` with echo + logprobs, max_tokens 0 included): the prompt's
log-probabilities are one forward pass of the policy. Tiny models built from config, no Ray."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

import pytest
import torch

from slmrl_ray.config import TinyModelConfig
from slmrl_ray.generation import score_prompts
from slmrl_ray.serving.api import CompletionRequest
from slmrl_ray.serving.app import Failure, Gateway
from slmrl_ray.serving.config import Limits, ServedModel
from slmrl_ray.serving.runners import PolicyRunner, Request, Sampling

PROMPTS = ["Once upon a time", "The town of", "A dog named Max who liked to run in the park"]


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def runner(request, tmp_path_factory) -> PolicyRunner:
    from slmrl_ray.tiny import tiny_model_dir

    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, vocab_size=300,
                          pretrain_documents=40, pretrain_steps=4, pretrain_batch_size=4)
    folder = tiny_model_dir(request.param, cfg, tmp_path_factory.mktemp("tiny"))
    model = ServedModel(model_id=f"ppo/{request.param}/x", stage="ppo", cell=f"{request.param}/x", uri=str(folder),
                        stage_uri=str(folder), fingerprint="f")
    return PolicyRunner(model, device="cpu", max_prompt_tokens=64)


def forward_logprobs(runner: PolicyRunner, ids: list[int]) -> torch.Tensor:
    """[L, V] the log-softmax of a forward pass over `ids` alone."""
    with torch.no_grad():
        return torch.log_softmax(runner.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_scored_prompts_in_one_padded_pass_equal_each_prompt_alone(runner):
    prompts = [runner.prompt_ids(p) for p in PROMPTS] + [runner.prompt_ids("Once")[:1]]
    assert len({len(p) for p in prompts}) == 4  # padding happens
    for rows_per_pass in (8, 3):
        scores = score_prompts(runner.model, prompts, [3, 0, 5, 2], runner.tokenizer.pad_token_id, runner.device,
                               rows_per_pass)
        for ids, top, score in zip(prompts, [3, 0, 5, 2], scores):
            forward = forward_logprobs(runner, ids)
            expected = forward[torch.arange(len(ids) - 1), ids[1:]]
            assert score.logprobs.shape == (len(ids) - 1,) and score.top_ids.shape == (len(ids) - 1, top)
            torch.testing.assert_close(score.logprobs, expected, atol=1e-5, rtol=0)
            best = forward[:-1].topk(top, dim=-1)
            torch.testing.assert_close(score.top_logprobs, best.values, atol=1e-5, rtol=0)
            assert score.top_ids.tolist() == best.indices.tolist()


def test_a_batch_mixes_scored_prompts_max_tokens_0_and_plain_requests(runner):
    ids = [runner.check_prompt(p) for p in PROMPTS]
    score_only = Request(ids[0], Sampling(max_tokens=0, temperature=0, logprobs=2, score_prompt=True, n=2))
    scored_and_generated = Request(ids[1], Sampling(max_tokens=5, temperature=0, logprobs=1, score_prompt=True))
    plain = Request(ids[2], Sampling(max_tokens=5, temperature=0))
    (nothing, tokens0), (both, _), (alone, _) = runner.complete_batch([score_only, scored_and_generated, plain])

    assert tokens0 == len(ids[0]) and len(nothing) == 2
    assert all(c.token_ids == [] and c.text == "" and c.finish_reason == "length" and c.logprobs == []
               for c in nothing)
    entries = nothing[0].prompt_logprobs
    forward = forward_logprobs(runner, ids[0])
    assert [e["token_id"] for e in entries] == ids[0]
    assert entries[0]["logprob"] is None and entries[0]["top"] is None
    for position, entry in enumerate(entries[1:], start=1):
        assert entry["logprob"] == pytest.approx(forward[position - 1, ids[0][position]].item(), abs=1e-5)
        assert [t["token_id"] for t in entry["top"]] == forward[position - 1].topk(2).indices.tolist()

    # The generated part is unchanged by scoring: the same tokens and logprobs as without it.
    (unscored,), _ = runner.complete_batch([Request(ids[1], Sampling(max_tokens=5, temperature=0, logprobs=1))])[0]
    assert both[0].token_ids == unscored.token_ids and len(both[0].token_ids) > 0
    assert [e["logprob"] for e in both[0].logprobs] == pytest.approx([e["logprob"] for e in unscored.logprobs])
    assert len(both[0].prompt_logprobs) == len(ids[1])
    assert alone[0].prompt_logprobs is None and alone[0].logprobs is None
    assert runner.complete_batch([score_only])[0][0][0].prompt_logprobs == entries  # alone or in a batch


class RunnerPolicy:
    """The policy deployment's handle, standing in: `complete.remote` calls the runner as
    `PolicyDeployment.complete` does."""

    def __init__(self, runner: PolicyRunner) -> None:
        self.runner, self.complete = runner, self

    def options(self, **_) -> "RunnerPolicy":
        return self

    async def remote(self, prompt, messages, sampling) -> dict:
        choices, prompt_tokens = self.runner.complete_batch(
            [Request(self.runner.check_prompt(prompt), Sampling(**sampling))])[0]
        return {"choices": [asdict(c) for c in choices], "prompt_tokens": prompt_tokens}


_GATEWAY = next(c for c in Gateway.func_or_class.__mro__ if "ASGI" not in c.__name__ and "_call" in vars(c))


def complete(runner: PolicyRunner, **fields) -> dict:
    """The gateway's answer to a `/v1/completions` body, without Serve."""
    gateway = object.__new__(_GATEWAY)
    gateway.policy, gateway.limits = RunnerPolicy(runner), Limits(max_tokens=32, request_timeout_s=30.0)
    gateway.catalog = {runner.served.model_id: runner.served}
    body = CompletionRequest(model=runner.served.model_id, **fields)
    return asyncio.run(gateway._completion(body, prompt=body.prompt, chat=False))


def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt_in_openais_shape(runner):
    prompt = PROMPTS[2]
    ids = runner.prompt_ids(prompt)
    answer = complete(runner, prompt=prompt, echo=True, logprobs=3, max_tokens=0, temperature=0)
    (choice,) = answer["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    logprobs, forward = choice["logprobs"], forward_logprobs(runner, ids)
    assert logprobs["token_ids"] == ids and "".join(logprobs["tokens"]) == prompt
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(forward[torch.arange(len(ids) - 1), ids[1:]].tolist(),
                                                           abs=1e-5)
    for position, top in enumerate(logprobs["top_logprobs"][1:]):  # keyed by text, as OpenAI's
        best = forward[position].topk(3).values.tolist()
        assert len(top) <= 3 and all(any(abs(v - b) < 1e-5 for b in best) for v in top.values())
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:k])) for k in range(len(ids))]

    # With a completion: the prompt's entries, then the completion's, offsets into prompt + completion.
    both = complete(runner, prompt=prompt, echo=True, logprobs=1, max_tokens=4, temperature=0)["choices"][0]
    generated = complete(runner, prompt=prompt, logprobs=1, max_tokens=4, temperature=0)["choices"][0]
    entries = both["logprobs"]
    assert both["text"] == prompt + generated["text"] and both["finish_reason"] == generated["finish_reason"]
    assert entries["token_ids"] == ids + generated["logprobs"]["token_ids"]
    assert entries["token_logprobs"][len(ids):] == pytest.approx(generated["logprobs"]["token_logprobs"])
    assert entries["text_offset"][len(ids):] == [len(prompt) + o for o in generated["logprobs"]["text_offset"]]
    assert entries["token_logprobs"][0] is None
    assert entries["token_logprobs"][1:len(ids)] == pytest.approx(logprobs["token_logprobs"][1:], abs=1e-6)

    # Echo without logprobs and max_tokens 0: the prompt, nothing generated.
    plain = complete(runner, prompt=prompt, echo=True, max_tokens=0)["choices"][0]
    assert plain["text"] == prompt and plain["logprobs"] is None and plain["finish_reason"] == "length"


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 0}, "max_tokens"),  # generates nothing, scores nothing
    ({"max_completion_tokens": 0, "logprobs": 1}, "max_completion_tokens"),
    ({"echo": True, "logprobs": 1, "stream": True}, "logprobs"),  # streamed prompt scores: not implemented
    ({"echo": True, "max_tokens": 0, "stream": True}, "max_tokens"),  # nothing to stream
])
def test_max_tokens_0_needs_echo_and_scoring_is_not_streamed(runner, fields, param):
    with pytest.raises(Failure) as raised:
        complete(runner, prompt="Once upon a time", **fields)
    assert raised.value.status == 400 and raised.value.param == param
