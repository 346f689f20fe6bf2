"""Tune configs, storage and the search objective: fast, no Ray session."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from slmrl_ray.artifacts import RunPaths, stage_fingerprints
from slmrl_ray.config import ConfigError
from slmrl_ray.tuning.config import Objective, grid_variants, load_tune_config
from slmrl_ray.tuning.experiment import phases
from slmrl_ray.storage import ArtifactStore, Storage, join_uri
from slmrl_ray.tuning.trial import ObjectiveTracker, restore_ppo_checkpoint

REPO = Path(__file__).resolve().parents[1]
TUNE_CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("tune_configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tune.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_tune_config_loads_and_builds_each_cell(path):
    experiment = load_tune_config(path)
    assert experiment.cells
    for cell in experiment.cells:
        config = experiment.cell_config(cell)
        assert f"{config.model}/{config.corpus}" == cell
    if "search" in path.stem:
        assert experiment.config.search is not None


def test_grid_axes_cross_the_cells_after_a_prepare_phase(tmp_path):
    experiment = load_tune_config(REPO / "tune_configs" / "tiny_algorithms.yaml")
    assert [(p.kind, p.stages) for p in phases(experiment, "grid")] == [
        ("prepare", ("data", "sft", "reward")), ("grid", ("data", "sft", "reward", "ppo", "eval"))]
    assert grid_variants(experiment.config) == [{"ppo.algorithm": a} for a in ("ppo", "grpo", "rloo")]
    configs = [experiment.cell_config(experiment.cells[0], v) for v in grid_variants(experiment.config)]
    assert [c.ppo.algorithm for c in configs] == ["ppo", "grpo", "rloo"]
    assert len({stage_fingerprints(c)["reward"] for c in configs}) == 1  # SFT and RM are shared
    plain = load_tune_config(REPO / "tune_configs" / "tiny_grid.yaml")
    assert [p.kind for p in phases(plain, "grid")] == ["grid"]
    with pytest.raises(ConfigError, match="grid: {'ppo.algorithm': 'dpo'}: ppo.algorithm: 'dpo' is not one of"):
        load_tune_config(write(tmp_path, "name: x\ngrid: {ppo.algorithm: [ppo, dpo]}\n"))
    with pytest.raises(ConfigError, match="a search samples instead"):
        load_tune_config(write(tmp_path, "name: x\ngrid: {ppo.algorithm: [ppo]}\nsearch: {}\n"))


def test_grid_defaults_to_all_fifteen_cells_in_the_study_order():
    experiment = load_tune_config(TUNE_CONFIGS[[p.stem for p in TUNE_CONFIGS].index("tiny_grid")])
    assert len(experiment.cells) == 15
    assert experiment.cells[0] == "pythia-70m/tinystories"
    # The tune config's overrides reach every cell's pipeline config.
    assert experiment.cell_config("smollm2-360m/wikitext").ppo.steps == 24
    assert experiment.cell_config("smollm2-360m/cnn_dailymail").reward.max_steps == 150  # its corpus_overrides


def test_sampled_values_become_pipeline_overrides(tmp_path):
    experiment = load_tune_config(write(tmp_path, "name: x\npipeline: {preset: tiny}\n"))
    config = experiment.cell_config("pythia-160m/cnn_dailymail",
                                    {"ppo.init_kl_coef": 0.123, "ppo.learning_rate": 1.5e-05})
    assert (config.model, config.corpus) == ("pythia-160m", "cnn_dailymail")
    assert config.ppo.init_kl_coef == 0.123 and config.ppo.learning_rate == 1.5e-05


def test_corpus_overrides_apply_to_that_corpus_only_after_the_common_ones(tmp_path):
    experiment = load_tune_config(write(tmp_path, (
        "name: x\npipeline: {preset: tiny, overrides: [reward.max_steps=40, ppo.steps=7],\n"
        "  corpus_overrides: {cnn_dailymail: [reward.max_steps=300]}}\n")))
    cnn = experiment.cell_config("pythia-70m/cnn_dailymail")
    stories = experiment.cell_config("pythia-70m/tinystories")
    assert (cnn.reward.max_steps, cnn.ppo.steps) == (300, 7)
    assert (stories.reward.max_steps, stories.ppo.steps) == (40, 7)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\npipeline: {corpus_overrides: {imagenet: [ppo.steps=3]}}\n",
         "pipeline.corpus_overrides.imagenet: unknown corpus"),
        ("name: x\npipeline: {corpus_overrides: {wikitext: [ppo.stepz=3]}}\n", "ppo.stepz: unknown key"),
        ("name: x\nresources: {cpus: 2}\n", "resources.cpus: unknown key"),
        ("name: x\nsearch: {kl_coef: {low: 0.2, high: 0.1}}\n", "search.kl_coef: a range needs"),
        ("name: x\nsearch: {objective: {kind: best}}\n", "search.objective.kind"),
        ("name: x\ncells: [pythia-70m/imagenet]\n", "cells: pythia-70m/imagenet: corpus"),
        ("name: x\npipeline: {preset: tiny, overrides: [ppo.stepz=3]}\n", "ppo.stepz: unknown key"),
        ("name: x\nstages: [sft, deploy]\n", "stages: 'deploy'"),
        ("name: x\nresources: {gpu: 1.5}\n", "fraction of one GPU"),
        ("resources: {gpu: 1}\n", "name: required key is missing"),
    ],
)
def test_bad_tune_configs_name_the_dotted_path(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_tune_config(write(tmp_path, text))


def test_a_search_prepares_each_cell_once_then_searches_per_cell(tmp_path):
    experiment = load_tune_config(write(tmp_path, "name: x\nmodels: [pythia-70m]\ncorpora: [tinystories, wikitext]\n"))
    planned = phases(experiment, "search")
    assert [p.name for p in planned] == ["prepare", "search-pythia-70m-tinystories", "search-pythia-70m-wikitext"]
    assert planned[0].stages == ("data", "sft", "reward") and planned[0].cells == experiment.cells
    assert [p.name for p in phases(experiment, "grid")] == ["grid"]


def test_storage_round_trip_on_local_paths_and_file_uris(tmp_path):
    source = tmp_path / "stage"
    (source / "model").mkdir(parents=True)
    (source / "model" / "weights.bin").write_bytes(b"123")
    (source / "checkpoints").mkdir()
    (source / "checkpoints" / "x").write_text("big")
    (source / "stage.json").write_text("{}")
    for uri in (str(tmp_path / "local"), f"file://{tmp_path}/uri"):
        place = Storage.from_uri(uri).child("a", "b")
        place.upload(source, exclude=("checkpoints",))
        assert place.list() == ["model", "stage.json"]
        place.download(tmp_path / "copy")
        assert (tmp_path / "copy" / "model" / "weights.bin").read_bytes() == b"123"
        assert not (tmp_path / "copy" / "checkpoints").exists()


def test_join_uri_keeps_the_endpoint_query():
    uri = "s3://bucket/exp?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(uri, "artifacts", "x") == "s3://bucket/exp/artifacts/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri("/data/exp", "a") == "/data/exp/a"


def test_artifact_store_fetches_a_stage_only_with_the_same_fingerprint(tmp_path, neox_run):
    import dataclasses

    config, paths, _ = neox_run
    store = ArtifactStore(Storage.from_uri(str(tmp_path / "store")), who="t1")
    store.started("sft", config)
    store.publish(paths, "sft", config)
    here = RunPaths(tmp_path / "here")
    assert store.fetch(here, "sft", config)
    assert (here.sft / "model" / "model.safetensors").read_bytes() == (paths.sft / "model" / "model.safetensors").read_bytes()
    changed = dataclasses.replace(config, sft=dataclasses.replace(config.sft, learning_rate=1.0))
    assert not store.fetch(RunPaths(tmp_path / "other"), "sft", changed)
    assert [(e["stage"], e["trial_id"]) for e in store.executions()] == [("sft", "t1")]


def test_objective_uses_training_rollouts_then_the_heldout_gain():
    tracker = ObjectiveTracker(Objective(kl_penalty=0.1, window=2))
    assert math.isnan(tracker.running()["objective"])
    for reward, kl in ((-4.0, 0.0), (-3.0, 1.0), (-2.0, 2.0), (-1.0, 4.0)):
        tracker.observe({"ppo/reward_mean": reward, "ppo/kl": kl})
    # last two (-1.5) against the first two (-3.5), minus 0.1 x mean KL of the last two (3.0)
    assert tracker.running() == pytest.approx({"objective": 2.0 - 0.3, "reward_gain": 2.0, "kl": 3.0})
    final = tracker.final({"delta_reward": 0.8}, {"kl_last": 5.0})
    assert final["objective"] == pytest.approx(0.8 - 0.5)
    # A diverged trial scores below anything a finished one could reach.
    assert tracker.diverged()["objective"] < -100


def test_a_judge_objective_scores_the_final_gain_with_the_judge(tmp_path):
    tracker = ObjectiveTracker(Objective(kl_penalty=0.1, score="judge"))
    final = tracker.final({"delta_reward": 0.8, "judge": {"delta": -0.2}}, {"kl_last": 1.0})
    assert final == pytest.approx({"objective": -0.2 - 0.1, "reward_gain": -0.2, "kl": 1.0})
    # A search that asks for the judge without one in the pipeline config is refused up front.
    text = "name: s\nsearch: {objective: {score: judge}}\n"
    with pytest.raises(ConfigError, match="search.objective.score: `judge` needs a judge"):
        load_tune_config(write(tmp_path, text))
    judged = "name: s\npipeline: {overrides: [judge.source=split]}\nsearch: {objective: {score: judge}}\n"
    assert load_tune_config(write(tmp_path, judged)).config.search.objective.score == "judge"


def test_a_tune_checkpoint_restores_the_ppo_state_and_its_log(tmp_path):
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "ppo" / "step-000004").mkdir(parents=True)
    (checkpoint / "ppo" / "step-000004" / "state.json").write_text('{"step": 4}')
    (checkpoint / "ppo" / "log.jsonl").write_text('{"step": 1}\n')
    paths = RunPaths(tmp_path / "run")
    assert restore_ppo_checkpoint(checkpoint, paths) == 4
    assert (paths.ppo / "checkpoints" / "step-000004" / "state.json").exists()
    assert (paths.ppo / "log.jsonl").read_text() == '{"step": 1}\n'
    assert restore_ppo_checkpoint(tmp_path / "empty", RunPaths(tmp_path / "run2")) == 0


def test_cli_exit_codes_for_a_bad_tune_config_and_a_folder_that_is_no_experiment(tmp_path, capsys):
    from slmrl_ray.cli import main

    assert main(["grid", str(write(tmp_path, "name: x\nresources: {gpus: 1}\n"))]) == 2
    assert "resources.gpus: unknown key" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "not an slmrl-ray experiment" in capsys.readouterr().err
    assert main(["resume", str(tmp_path)]) == 1


def test_search_settings_reach_optuna_asha_and_the_concurrency_limit(tmp_path):
    from slmrl_ray.tuning.experiment import _search_tune_config

    experiment = load_tune_config(write(tmp_path, (
        "name: x\ncells: [pythia-70m/tinystories]\npipeline: {preset: tiny, overrides: [ppo.steps=30]}\n"
        "search: {num_samples: 6, max_concurrent: 3, scheduler: {grace_period: 50}}\n")))
    search_phase = phases(experiment, "search")[1]
    tune_config = _search_tune_config(experiment, search_phase, index=2)
    assert (tune_config.metric, tune_config.mode, tune_config.num_samples) == ("objective", "max", 6)
    assert tune_config.search_alg.max_concurrent == 3
    assert tune_config.search_alg.searcher._seed == 2  # one study per cell, each with its own seed
    scheduler = tune_config.scheduler
    assert scheduler._time_attr == "ppo_step" and scheduler._max_t == 30
    assert scheduler._brackets[0]._rungs[-1][0] == 30  # grace period capped at the PPO steps

    pareto = load_tune_config(write(tmp_path, (
        "name: x\ncells: [pythia-70m/tinystories]\nsearch: {objective: {kind: pareto}}\n")))
    tune_config = _search_tune_config(pareto, phases(pareto, "search")[1], index=0)
    assert tune_config.search_alg.searcher.metric == ["reward_gain", "kl"]
    assert tune_config.search_alg.searcher.mode == ["max", "min"]
