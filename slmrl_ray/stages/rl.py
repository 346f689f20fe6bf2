"""The `ppo` stage's entry: `run_rl` runs the algorithm `ppo.algorithm` names.

`ppo` is our own PPO (`stages.ppo`); `grpo` and `rloo` are TRL's trainers (`stages.trl_rl`).
Both read the same inputs and write the same `ppo/` folder (`stages.ppo_state`), so the
pipeline, Tune and Serve do not ask which one ran.
"""

from __future__ import annotations

from slmrl_ray.artifacts import Reporter, RunPaths, no_report
from slmrl_ray.config import PipelineConfig


def run_rl(config: PipelineConfig, paths: RunPaths, report: Reporter = no_report) -> dict:
    if config.ppo.algorithm == "ppo":
        from slmrl_ray.stages.ppo import run_ppo as run
    else:  # GRPO / RLOO; TRL loads only when asked for
        from slmrl_ray.stages.trl_rl import run_trl_rl as run
    return run(config, paths, report)
