"""The whole tiny pipeline on both architectures, through the CLI, and what each stage must prove."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from slmrl_ray.artifacts import STAGES, RunPaths, read_json
from slmrl_ray.cli import main
from slmrl_ray.data import EvalExample, PreferencePair, load_jsonl

pytestmark = pytest.mark.slow


def test_every_stage_finishes_with_its_artifacts(pipeline_run):
    config, paths, stdout = pipeline_run
    for stage in STAGES:
        marker = read_json(paths.stage(stage) / "stage.json")
        assert marker["stage"] == stage
        assert read_json(paths.stage(stage) / "config.json")["model"] == config.model
    for stage in ("sft", "reward", "ppo"):
        assert (paths.stage(stage) / "model" / "model.safetensors").exists()
        assert not list(paths.stage(stage).rglob("*.bin")), "weights must be safetensors"
    # The results row is the last thing the CLI prints.
    assert f"| {config.model} | {config.corpus} |" in stdout.splitlines()[-1]


def test_sft_and_reward_model_learned(pipeline_run):
    config, paths, _ = pipeline_run
    sft = read_json(paths.sft / "metrics.json")
    assert sft["lora_max_change"] > 0
    assert sft["heldout_perplexity"] < 20, sft  # the tiny models write the corpus after SFT
    reward = read_json(paths.reward / "metrics.json")
    assert reward["heldout_pairs"] >= 20
    assert reward["heldout_accuracy"] >= 0.9, reward


def test_ppo_raised_the_reward_with_a_finite_nonnegative_kl(pipeline_run):
    config, paths, _ = pipeline_run
    log = [json.loads(line) for line in (paths.ppo / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, config.ppo.steps + 1))
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # fresh LoRA: the policy starts at the reference
    window = 8
    first = sum(r["reward_mean"] for r in log[:window]) / window
    last = sum(r["reward_mean"] for r in log[-window:]) / window
    assert last > first + 0.1, (first, last)  # measured gains: +0.27 to +1.4 over 40 steps
    kls = [r["kl"] for r in log]
    assert all(math.isfinite(k) for k in kls)
    assert sum(kls[-window:]) / window >= 0
    for key in ("reward_std", "kl_coef", "entropy", "clip_fraction", "ratio_mean", "value_loss",
                "response_length", "rollbacks"):
        assert all(math.isfinite(r[key]) for r in log), key


def test_evaluation_reports_the_study_metrics(pipeline_run):
    config, paths, _ = pipeline_run
    results = read_json(paths.eval / "evaluation_results.json")
    # one prompt per held-out prompt group up to eval.num_prompts, less any without a
    # continuation (a one-sentence story)
    prompts = (paths.data / "eval.jsonl").read_text().splitlines()
    assert results["num_prompts"] == len(prompts) >= 0.95 * config.eval.num_prompts
    for policy in ("sft", "ppo"):
        metrics = results[policy]
        assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1
        assert set(metrics["reward"]) == {"mean", "std", "min", "max", "n"}
        assert metrics["reward"]["min"] <= metrics["reward"]["mean"] <= metrics["reward"]["max"]
        assert 0 < metrics["distinct_1"] <= 1 and 0 < metrics["distinct_2"] <= 1
        samples = (paths.eval / f"samples_{policy}.jsonl").read_text().splitlines()
        assert len(samples) == results["num_prompts"]
    delta = results["ppo"]["reward"]["mean"] - results["sft"]["reward"]["mean"]
    assert results["delta_reward"] == pytest.approx(delta)
    paired = results["paired_win_rate"]
    assert paired["ci_low"] <= paired["win_rate"] <= paired["ci_high"]
    # At a seed the preset's budgets were not chosen on (conftest.FRESH_SEED), on prompts no
    # training stage saw: PPO beats SFT on the reward it was trained for, on more prompts than
    # not. Whether that gain is confirmed (its interval and the judge's above 50 %) is counted
    # over the grid's cells (test_tune); at seed 7 this pythia-70m cell's interval reaches 49.6 %.
    assert delta > 0, "PPO should beat SFT on the reward it was trained for"
    assert paired["win_rate"] > 0.5, paired
    assert results["judge"]["heldout_accuracy"] >= 0.85, results["judge"]  # the judge ranks held-out pairs
    # No short, long or repetitive answers. The judge's own flag is a finding, not a failure of
    # the pipeline: at seed 7 the independent judge does not confirm smollm2-135m/wikitext's gain
    # (+1.21 reward, judge -0.10), as it confirms few of the tiny Llamas' (docs/results.md).
    behaviour = [flag for flag in results["hacking_flags"] if not flag.startswith("judge")]
    assert not behaviour, results["hacking_flags"]


def test_rerun_skips_every_finished_stage(pipeline_run):
    config, paths, _ = pipeline_run
    before = {s: (paths.stage(s) / "stage.json").read_text() for s in STAGES}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["run", "--preset", "tiny", "--model", config.model, "--corpus", config.corpus,
                     "--output-dir", config.output_dir, f"seed={config.seed}", f"data.seed={config.data.seed}",
                     f"eval.seed={config.eval.seed}"]) == 0
    assert stdout.getvalue().count("skipping") == len(STAGES)
    assert before == {s: (paths.stage(s) / "stage.json").read_text() for s in STAGES}


def test_ppo_resumes_from_its_last_checkpoint_and_matches_the_uninterrupted_run(pipeline_run, tmp_path):
    from slmrl_ray.pipeline import run_pipeline

    config, paths, _ = pipeline_run
    if config.model_config.family != "gpt_neox":
        pytest.skip("one architecture is enough for resume")
    copy = RunPaths(tmp_path / config.model / config.corpus)
    shutil.copytree(paths.root, copy.root)
    final = load_file(paths.ppo / "model" / "model.safetensors")
    # Lose the PPO stage's final output and its newest checkpoint, as a crash would.
    shutil.rmtree(copy.ppo / "model")
    (copy.ppo / "stage.json").unlink()
    checkpoints = sorted((copy.ppo / "checkpoints").glob("step-*"))
    shutil.rmtree(checkpoints[-1])
    resume_step = int(checkpoints[-2].name.split("-")[1])
    assert 0 < resume_step < config.ppo.steps

    resumed_config = dataclasses.replace(config, output_dir=str(tmp_path))  # same fingerprints
    results = run_pipeline(resumed_config, stages=["ppo"], log=lambda _: None)
    assert results["ppo"]["resumed_from_step"] == resume_step
    log = [json.loads(line) for line in (copy.ppo / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, config.ppo.steps + 1))
    resumed = load_file(copy.ppo / "model" / "model.safetensors")
    for name, tensor in final.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_pairs_come_only_from_the_training_split(pipeline_run):
    """Every pair is cut from a training document; no evaluation example is a training document."""
    config, paths, _ = pipeline_run
    train = [json.loads(line)["text"] for line in (paths.data / "train.jsonl").read_text().splitlines()]
    heldout = {json.loads(line)["text"] for line in (paths.data / "heldout.jsonl").read_text().splitlines()}
    assert not heldout & set(train)
    pairs = load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair) + load_jsonl(
        paths.data / "pairs_heldout.jsonl", PreferencePair
    )
    prompts_of_train = {text.split(". ")[0] for text in train}
    for pair in pairs:
        assert pair.prompt.rstrip(".") in prompts_of_train
    for example in load_jsonl(paths.data / "eval.jsonl", EvalExample):  # first sentence, then the rest
        assert f"{example.prompt} {example.reference}" in heldout
