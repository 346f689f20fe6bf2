"""`slmrl-ray bench <what>`: measured speed, printed as a markdown table and written as JSON.

    slmrl-ray bench stages  [--preset tiny] [--model ...] [--corpus ...] [a.b.c=value ...]
    slmrl-ray bench rollout [same options] [--repeats 5]
    slmrl-ray bench rl      [same options] [--repeats 3]
    slmrl-ray bench shapes  [--models a,b] [--peak-tflops X] [a.b.c=value ...]   (bench.shapes)
    slmrl-ray bench tune    <experiment folder or URI> [more experiments to compare]   (bench.tune)
    slmrl-ray bench serve   --registry <experiment or registry.json>   (bench.serve, bench.naive)

- `stages` runs one configuration from scratch in a scratch folder: SFT tokens/s and RM
  pairs/s (over the optimiser loop, `train_runtime`), the PPO step split into generation,
  scoring and update with rollout tokens/s (steps after the first), evaluation time, and
  peak memory. `shapes` runs it on the study models at full size and projects the paper grid.
- `rollout` compares one PPO rollout (sampling, reward scoring, policy/reference/value
  passes, GAE) with bare `generate` on the same model, prompts, batch and length.
- `rl` runs a few steps of our PPO and of TRL's GRPO and RLOO (`ppo.algorithm`) on the same
  configuration: the same rollout batch (responses per step), response length and optimiser
  updates per step (`stages.trl_rl` maps them), and the mean step time after a warm-up step,
  as a ratio to PPO. GRPO/RLOO sample `num_generations` responses per prompt, so a step holds
  fewer distinct prompts. The last step (it saves the final checkpoint) is not timed either.
- `tune` reads a finished grid or search: the span of its trials against the sum of
  trial times divided by the concurrency that ran (Tune's overhead). Given several (the
  same grid at `resources.gpu=1` and `=0.25`, say), it adds each one's speed-up over the first.
- `serve` sends the same requests to the Ray Serve application and to a naive one-process
  server (`naive`), one after the other, at several concurrencies.
`stages`, `rollout` and `rl` live in `bench.stages`. Every JSON records the machine (CPU or
GPU name), library versions and the settings (`bench.common`).
"""
