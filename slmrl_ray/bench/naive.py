"""The serving baseline: one FastAPI process, one policy and one reward model, one request at a time.

This is how the original study served (a single process around `generate`), kept only as
the baseline of the serving benchmark (`slmrl-ray bench serve`, `slmrl_ray.bench.serve`). It reuses
the same runners as the Ray Serve deployments, so the comparison measures serving, not
model code. Run alone:

    python -m slmrl_ray.bench.naive --policy PATH_OR_URI --reward PATH_OR_URI --port 8100
"""

from __future__ import annotations

import argparse
import threading

from fastapi import FastAPI
from pydantic import BaseModel

from slmrl_ray.serving.config import ServedModel
from slmrl_ray.serving.runners import PolicyRunner, RewardRunner, Sampling
from slmrl_ray.storage import join_uri


class _Completion(BaseModel):
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0


class _Pair(BaseModel):
    prompt: str
    response: str


class _Rewards(BaseModel):
    pairs: list[_Pair]


def _served(stage_uri: str, stage: str) -> ServedModel:
    return ServedModel(f"{stage}/naive", stage, "naive", join_uri(stage_uri, "model"), stage_uri, "unknown")


def naive_app(policy_stage_uri: str, reward_stage_uri: str, device: str = "cpu") -> FastAPI:
    policy = PolicyRunner(_served(policy_stage_uri, "ppo"), device)
    reward = RewardRunner(_served(reward_stage_uri, "reward"), device)
    one_at_a_time = threading.Lock()
    app = FastAPI(title="naive baseline")

    @app.post("/v1/completions")
    def completions(body: _Completion) -> dict:
        with one_at_a_time:
            choices, used = policy.complete(body.prompt, Sampling(body.max_tokens, body.temperature, body.top_p))
        return {"choices": [{"index": 0, "text": choices[0].text}], "usage": {"prompt_tokens": used}}

    @app.post("/v1/rewards")
    def rewards(body: _Rewards) -> dict:
        with one_at_a_time:
            scores = reward.score([p.prompt for p in body.pairs], [p.response for p in body.pairs])
        return {"scores": scores}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a policy stage folder (holding model/)")
    parser.add_argument("--reward", required=True, help="a reward stage folder (holding model/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    uvicorn.run(naive_app(args.policy, args.reward), host=args.host, port=args.port, workers=1, log_level="warning")


if __name__ == "__main__":
    main()
