"""Tune configs, storage and the search objective: fast, no Ray session."""

from __future__ import annotations

import json
import math
import os
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


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.stem)
def test_no_shipped_config_has_a_cell_override_without_the_search_that_chose_it(path):
    """A cell's own settings come from a search (README: search -> budgets.yaml -> grid,
    `pipeline.cell_overrides_from`), never from hand picks made by reading a grid's own numbers."""
    cell_overrides = load_tune_config(path).config.pipeline.cell_overrides
    assert [cell for cell, entry in cell_overrides.items() if entry.hand_picked] == []


def test_grid_axes_cross_the_cells_after_a_prepare_phase(tmp_path):
    experiment = load_tune_config(REPO / "tune_configs" / "tiny_algorithms.yaml")
    assert [[(p.name, p.stages) for p in lane] for lane in phases(experiment, "grid")] == [
        [("prepare-pythia-70m-tinystories", ("data", "sft", "reward")),
         ("grid-pythia-70m-tinystories", ("data", "sft", "reward", "ppo", "eval"))]]
    assert grid_variants(experiment.config) == [{"ppo.algorithm": a} for a in ("ppo", "grpo", "rloo")]
    configs = [experiment.cell_config(experiment.cells[0], v) for v in grid_variants(experiment.config)]
    assert [c.ppo.algorithm for c in configs] == ["ppo", "grpo", "rloo"]
    assert len({stage_fingerprints(c)["reward"] for c in configs}) == 1  # SFT and RM are shared
    plain = load_tune_config(REPO / "tune_configs" / "tiny_grid.yaml")
    assert [[p.kind for p in lane] for lane in phases(plain, "grid")] == [["grid"]]
    with pytest.raises(ConfigError, match="grid: {'ppo.algorithm': 'dpo'}: ppo.algorithm: 'dpo' is not one of"):
        load_tune_config(write(tmp_path, "name: x\ngrid: {ppo.algorithm: [ppo, dpo]}\n"))
    with pytest.raises(ConfigError, match="a search samples instead"):
        load_tune_config(write(tmp_path, "name: x\ngrid: {ppo.algorithm: [ppo]}\nsearch: {}\n"))


def test_grid_defaults_to_all_fifteen_cells_in_the_study_order():
    experiment = load_tune_config(TUNE_CONFIGS[[p.stem for p in TUNE_CONFIGS].index("tiny_grid")])
    assert len(experiment.cells) == 15
    assert experiment.cells[0] == "pythia-70m/tinystories"
    # The tune config's overrides reach every cell's pipeline config.
    assert experiment.cell_config("smollm2-360m/wikitext").judge.source == "split"
    assert experiment.cell_config("smollm2-360m/wikitext").judge.base_model == "other_family"
    assert experiment.cell_config("pythia-70m/cnn_dailymail").reward.max_steps == 300  # its corpus_overrides
    reward = experiment.cell_config("smollm2-360m/cnn_dailymail").reward  # corpus, then model overrides
    assert (reward.max_steps, reward.learning_rate) == (300, 1e-3)
    assert experiment.cell_config("smollm2-135m/cnn_dailymail").reward.learning_rate == 2e-3


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


def test_model_overrides_apply_to_that_model_only_after_the_corpus_ones(tmp_path):
    experiment = load_tune_config(write(tmp_path, (
        "name: x\npipeline: {preset: tiny, overrides: [ppo.init_kl_coef=0.1],\n"
        "  corpus_overrides: {wikitext: [ppo.init_kl_coef=0.2, ppo.steps=7]},\n"
        "  model_overrides: {smollm2-360m: [ppo.init_kl_coef=0.4]}}\n")))
    big = experiment.cell_config("smollm2-360m/wikitext")
    small = experiment.cell_config("smollm2-135m/wikitext")
    assert (big.ppo.init_kl_coef, big.ppo.steps) == (0.4, 7)
    assert (small.ppo.init_kl_coef, small.ppo.steps) == (0.2, 7)
    assert experiment.cell_config("smollm2-360m/tinystories").ppo.init_kl_coef == 0.4


def test_cell_overrides_apply_to_that_cell_only_after_the_model_ones(tmp_path):
    experiment = load_tune_config(write(tmp_path, (
        "name: x\npipeline: {preset: tiny, model_overrides: {smollm2-360m: [ppo.init_kl_coef=0.4]},\n"
        "  cell_overrides: {smollm2-360m/cnn_dailymail: [ppo.init_kl_coef=0.3, reward.max_steps=9]}}\n")))
    cell = experiment.cell_config("smollm2-360m/cnn_dailymail")
    assert (cell.ppo.init_kl_coef, cell.reward.max_steps) == (0.3, 9)
    for other in ("smollm2-360m/wikitext", "smollm2-135m/cnn_dailymail"):
        assert experiment.cell_config(other).reward.max_steps != 9
    assert experiment.cell_config("smollm2-360m/wikitext").ppo.init_kl_coef == 0.4


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\npipeline: {corpus_overrides: {imagenet: [ppo.steps=3]}}\n",
         "pipeline.corpus_overrides.imagenet: unknown corpus"),
        ("name: x\npipeline: {corpus_overrides: {wikitext: [ppo.stepz=3]}}\n", "ppo.stepz: unknown key"),
        ("name: x\npipeline: {model_overrides: {gpt-2: [ppo.steps=3]}}\n",
         "pipeline.model_overrides.gpt-2: unknown model"),
        ("name: x\npipeline: {cell_overrides: {gpt-2/wikitext: [ppo.steps=3]}}\n",
         "pipeline.cell_overrides.gpt-2/wikitext: not a model/corpus cell"),
        ("name: x\npipeline: {cell_overrides: {smollm2-360m: [ppo.steps=3]}}\n",
         "pipeline.cell_overrides.smollm2-360m: not a model/corpus cell"),
        ("name: x\nresources: {cpus: 2}\n", "resources.cpus: unknown key"),
        ("name: x\nsearch: {kl_coef: {low: 0.2, high: 0.1}}\n", "search.kl_coef: a range needs"),
        ("name: x\nsearch: {objective: {kind: best}}\n", "search.objective.kind"),
        ("name: x\nsearch: {steps: [0, 20]}\n", "search: steps: the PPO step counts to choose from must be"),
        ("name: x\nsearch: {steps: [20, 20]}\n", "search: steps: the PPO step counts to choose from must be"),
        ("name: x\nsearch: {steps: [20, 20.5]}\n", r"search.steps\[1\]: expected an integer"),
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
    # A lane per cell, side by side: its prepare, then its search (no cell waits for another's prepare).
    assert [[p.name for p in lane] for lane in planned] == [
        ["prepare-pythia-70m-tinystories", "search-pythia-70m-tinystories"],
        ["prepare-pythia-70m-wikitext", "search-pythia-70m-wikitext"]]
    prepare = planned[1][0]
    assert prepare.stages == ("data", "sft", "reward") and prepare.cells == ("pythia-70m/wikitext",)
    assert [[p.name for p in lane] for lane in phases(experiment, "grid")] == [["grid"]]


def test_prepare_builds_each_distinct_upstream_fingerprint_once(tmp_path):
    from slmrl_ray.tuning.experiment import units

    experiment = load_tune_config(write(tmp_path, (
        "name: x\nmodels: [pythia-70m]\ncorpora: [tinystories, wikitext]\n"
        "grid: {sft.learning_rate: [0.001, 0.002], ppo.algorithm: [ppo, grpo, rloo]}\n")))
    lanes = phases(experiment, "grid")
    planned = [unit for lane in lanes for unit in units(experiment, lane[0])]
    # Two SFT settings x two cells; the algorithm only changes PPO, so it never multiplies them.
    assert sorted((u["cell"], u["grid"]["sft.learning_rate"]) for u in planned) == [
        ("pythia-70m/tinystories", 0.001), ("pythia-70m/tinystories", 0.002),
        ("pythia-70m/wikitext", 0.001), ("pythia-70m/wikitext", 0.002)]
    assert sum(len(units(experiment, lane[1])) for lane in lanes) == 12


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
    assert math.isnan(tracker.running()["running_objective"])
    for reward, kl in ((-4.0, 0.0), (-3.0, 1.0), (-2.0, 2.0), (-1.0, 4.0)):
        tracker.observe({"ppo/reward_mean": reward, "ppo/kl": kl})
    # last two (-1.5) against the first two (-3.5), minus 0.1 x mean KL of the last two (3.0):
    # ASHA's number, under its own name; Optuna's `objective` stays NaN until the evaluation.
    running = tracker.running()
    assert {k: running[k] for k in ("running_objective", "running_reward_gain", "running_kl")} == pytest.approx(
        {"running_objective": 2.0 - 0.3, "running_reward_gain": 2.0, "running_kl": 3.0})
    assert all(math.isnan(running[k]) for k in ("objective", "reward_gain", "kl"))
    final = tracker.final({"delta_reward": 0.8}, {"kl_last": 5.0})
    assert final["objective"] == pytest.approx(0.8 - 0.5) and final["objective_final"]
    # A search reads its validation share when the evaluation has one, never the reported (test) share.
    split = tracker.final({"delta_reward": 0.8, "validation": {"delta_reward": 0.1}}, {"kl_last": 5.0})
    assert split["objective"] == pytest.approx(0.1 - 0.5)
    # A diverged trial scores below anything a finished one could reach.
    assert tracker.diverged()["objective"] < -100


def test_a_judge_objective_scores_the_final_gain_with_the_judge(tmp_path):
    tracker = ObjectiveTracker(Objective(kl_penalty=0.1, score="judge"))
    final = tracker.final({"delta_reward": 0.8, "judge": {"delta": -0.2}}, {"kl_last": 1.0})
    assert {k: final[k] for k in ("objective", "reward_gain", "kl")} == pytest.approx(
        {"objective": -0.2 - 0.1, "reward_gain": -0.2, "kl": 1.0})
    # A search that asks for the judge without one in the pipeline config is refused up front.
    text = "name: s\npipeline: {overrides: [judge.source=none]}\nsearch: {objective: {score: judge}}\n"
    with pytest.raises(ConfigError, match="search.objective.score: `judge` needs a judge"):
        load_tune_config(write(tmp_path, text))
    judged = "name: s\nsearch: {objective: {score: judge}}\n"  # the tiny preset's judge
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


def one_cell_search(tmp_path, ppo_steps: int, search: str):
    """A search of pythia-70m/tinystories with `ppo_steps` PPO steps and the `search:` flow mapping `search`."""
    return load_tune_config(write(tmp_path, (
        "name: x\ncells: [pythia-70m/tinystories]\n"
        f"pipeline: {{preset: tiny, overrides: [ppo.steps={ppo_steps}]}}\nsearch: {search}\n")))


def test_search_settings_reach_optuna_asha_and_the_concurrency_limit(tmp_path):
    from ray.tune.schedulers import FIFOScheduler

    from slmrl_ray.tuning.experiment import _search_tune_config

    experiment = one_cell_search(tmp_path, 30, "{num_samples: 6, max_concurrent: 3, scheduler: {grace_period: 5}}")
    search_phase = phases(experiment, "search")[0][1]
    tune_config = _search_tune_config(experiment, search_phase, index=2)
    assert tune_config.num_samples == 6 and tune_config.search_alg.max_concurrent == 3
    searcher = tune_config.search_alg.searcher
    assert (searcher.metric, searcher.mode, searcher._seed) == ("objective", "max", 2)  # one study per cell
    scheduler = tune_config.scheduler
    assert (scheduler._time_attr, scheduler.metric, scheduler._mode) == ("ppo_step", "running_objective", "max")
    assert [rung for rung, _ in scheduler._brackets[0]._rungs] == [20, 10, 5]

    few = one_cell_search(tmp_path, 30, "{scheduler: {grace_period: 30}}")
    assert isinstance(_search_tune_config(few, phases(few, "search")[0][1], 0).scheduler, FIFOScheduler)


def test_searched_ppo_steps_become_overrides_and_asha_rungs_lie_below_the_shortest_choice(tmp_path):
    from slmrl_ray.tuning.experiment import _param_space, _search_tune_config

    experiment = one_cell_search(tmp_path, 50, "{steps: [20, 40], scheduler: {grace_period: 5}}")
    phase = phases(experiment, "search")[0][1]
    tune_config = _search_tune_config(experiment, phase, index=0)
    # Below the shortest choice (20), not the pipeline config's 50: a 20-step trial is always evaluated.
    assert [rung for rung, _ in tune_config.scheduler._brackets[0]._rungs] == [10, 5]
    searcher = tune_config.search_alg.searcher
    searcher.set_search_properties(None, None, _param_space(experiment, phase, None))
    chosen = set()
    for trial in range(8):
        sampled = searcher.suggest(f"t{trial}")["search"]
        assert sorted(sampled) == ["ppo.init_kl_coef", "ppo.learning_rate", "ppo.steps"]
        config = experiment.cell_config("pythia-70m/tinystories", sampled)
        assert config.ppo.steps == sampled["ppo.steps"] and config.ppo.init_kl_coef == sampled["ppo.init_kl_coef"]
        chosen.add(config.ppo.steps)
    assert chosen == {20, 40}


@pytest.mark.parametrize("steps, grace, rf", [(16, 8, 2), (32, 4, 2), (27, 3, 3), (9, 8, 2), (100, 10, 3)])
def test_asha_has_no_rung_at_the_last_ppo_step(steps, grace, rf):
    """With a rung at the last step, ASHA stops a finished trial before its evaluation (Ray's
    ASHA puts one at max_t = 16 for grace 8, rf 2)."""
    from ray.tune.schedulers import ASHAScheduler

    from slmrl_ray.tuning.experiment import asha_scheduler

    rungs = [rung for rung, _ in asha_scheduler(steps, grace, rf)._brackets[0]._rungs]
    assert rungs and all(rung < steps for rung in rungs) and min(rungs) == grace
    if (steps, grace, rf) == (16, 8, 2):  # what was wrong: max_t = steps
        naive = ASHAScheduler(time_attr="ppo_step", metric="m", mode="max", max_t=16, grace_period=8, reduction_factor=2)
        assert [rung for rung, _ in naive._brackets[0]._rungs] == [16, 8]


def test_optuna_learns_final_objectives_only_and_a_stopped_trial_is_pruned(tmp_path):
    import math

    from optuna.trial import TrialState

    from slmrl_ray.tuning.experiment import _param_space, _search_tune_config

    experiment = load_tune_config(write(tmp_path, "name: x\ncells: [pythia-70m/tinystories]\nsearch: {}\n"))
    phase = phases(experiment, "search")[0][1]
    searcher = _search_tune_config(experiment, phase, index=0).search_alg.searcher
    searcher.set_search_properties(None, None, _param_space(experiment, phase, None))
    running = {"objective": math.nan, "running_objective": 0.9, "training_iteration": 3, "ppo_step": 3}
    for trial in ("stopped", "finished"):
        assert sorted(searcher.suggest(trial)["search"]) == ["ppo.init_kl_coef", "ppo.learning_rate"]
        searcher.on_trial_result(trial, running)
    searcher.on_trial_complete("stopped", running)  # ASHA stopped it mid-PPO
    searcher.on_trial_complete("finished", {**running, "objective": 0.25, "objective_final": True})
    stopped, finished = searcher._ot_study.trials
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {}
    assert finished.state == TrialState.COMPLETE and finished.value == 0.25

    pareto = load_tune_config(write(tmp_path, (
        "name: x\ncells: [pythia-70m/tinystories]\nsearch: {objective: {kind: pareto}}\n")))
    phase = phases(pareto, "search")[0][1]
    tune_config = _search_tune_config(pareto, phase, index=0)
    searcher = tune_config.search_alg.searcher
    assert searcher.metric == ["reward_gain", "kl"]
    assert searcher.mode == ["max", "min"]
    # Two objectives: a trial without final numbers still leaves the study's RUNNING state.
    searcher.set_search_properties(None, None, _param_space(pareto, phase, None))
    running = {"reward_gain": math.nan, "kl": math.nan, "running_objective": 0.9, "training_iteration": 3}
    for trial in ("stopped", "failed", "finished"):
        searcher.suggest(trial)
        searcher.on_trial_result(trial, running)
    searcher.on_trial_complete("stopped", running)
    searcher.on_trial_complete("failed", running, error=True)
    searcher.on_trial_complete("finished", {**running, "reward_gain": 0.3, "kl": 2.0, "objective_final": True})
    stopped, failed, finished = searcher._ot_study.trials
    assert (stopped.state, failed.state) == (TrialState.PRUNED, TrialState.FAIL)
    assert finished.state == TrialState.COMPLETE and finished.values == [0.3, 2.0]


def test_cells_whose_prepare_failed_are_skipped_and_every_expected_cell_gets_a_row(tmp_path):
    from slmrl_ray.tuning.experiment import (
        _skip_unprepared,
        experiment_root,
        unit_key,
        upstream_fingerprint,
        write_failures,
        write_manifest,
        write_report,
    )

    experiment = load_tune_config(write(tmp_path, (
        f"name: x\nstorage_path: {tmp_path / 'runs'}\nmodels: [pythia-70m]\ncorpora: [tinystories, wikitext, cnn_dailymail]\n"
        "grid: {ppo.algorithm: [ppo, grpo]}\n")))
    root = experiment_root(experiment)
    write_manifest(experiment, "grid", root)
    failed = [{"phase": "prepare-pythia-70m-wikitext", "cell": "pythia-70m/wikitext", "params": {},
               "unit": unit_key({"cell": "pythia-70m/wikitext", "grid": {"ppo.algorithm": "ppo"}}),
               "state": "failed", "trial_id": "p1", "error": "OutOfMemoryError: CUDA out of memory"}]
    prepare, grid = next(lane for lane in phases(experiment, "grid") if lane[0].cells == ("pythia-70m/wikitext",))
    unprepared = {upstream_fingerprint(experiment, json.loads(failed[0]["unit"]), prepare.stages)}
    assert _skip_unprepared(experiment, prepare, unprepared, failed) == set()
    # The two variants share the failed prepare's upstream stages.
    skipped = _skip_unprepared(experiment, grid, unprepared, failed)
    assert len(skipped) == 2 and [f["state"] for f in failed] == ["failed", "skipped", "skipped"]
    write_failures(root, failed)
    record = {"experiment": "x", "kind": "grid", "trial_id": "t1", "model": "pythia-70m", "corpus": "tinystories",
              "params": {"ppo.algorithm": "ppo"}, "objective": None, "diverged": True, "error": "NaN at step 3",
              "evaluation": None, "fingerprints": {}, "metrics": {}}
    root.child("results", "t1.json").write_json(record)
    rows = write_report(root, log=lambda line: None)["rows"]
    states = {(r["corpus"], r["params"].get("ppo.algorithm")): (r["state"], r["reason"]) for r in rows}
    assert len(rows) == 6  # 3 cells x 2 variants, finished or not
    assert states[("tinystories", "ppo")] == ("diverged", "PPO diverged: NaN at step 3")
    assert states[("tinystories", "grpo")] == ("not run", "not run yet")
    assert states[("wikitext", "grpo")] == (
        "skipped", "skipped in grid-pythia-70m-wikitext: its data, SFT or reward model failed in `prepare`")
    assert states[("cnn_dailymail", "ppo")][0] == "not run"
    markdown = root.child("report", "results.md").read_text()
    assert "- pythia-70m / wikitext [ppo.algorithm=grpo]: skipped in grid-pythia-70m-wikitext:" in markdown


def test_a_failed_prepare_skips_only_the_variants_built_on_it_whatever_device_the_driver_has(tmp_path, monkeypatch):
    """The driver (a CPU head) and the trials (GPU workers) resolve `precision: auto` apart, so
    their fingerprints differ: which variants lost their prepare is decided on the driver's own."""
    from slmrl_ray import artifacts
    from slmrl_ray.tuning import experiment as driver
    from slmrl_ray.tuning.experiment import experiment_root, run_lane, unit_key

    experiment = load_tune_config(write(tmp_path, (
        f"name: x\nstorage_path: {tmp_path / 'runs'}\ncells: [pythia-70m/tinystories]\n"
        "grid: {sft.learning_rate: [0.001, 0.002], ppo.algorithm: [ppo, grpo]}\n")))
    root = experiment_root(experiment)
    store = ArtifactStore(root.child("artifacts"))
    machine = artifacts.runtime(experiment.cell_config(experiment.cells[0]).device)
    on_a_gpu = {**machine, "device": "cuda", "bf16": True}
    given: dict[str, list] = {}

    def fit_phase(experiment, phase, index, root_uri, artifacts_uri, todo, log=print):
        given[phase.kind] = todo
        if phase.kind != "prepare":
            return []
        failures = []
        for unit in todo:
            if unit["grid"]["sft.learning_rate"] == 0.001:  # out of memory, say
                failures.append({"phase": phase.name, "unit": unit_key(unit), "cell": unit["cell"],
                                 "params": unit["grid"], "state": "failed", "error": "OutOfMemoryError"})
                continue
            with monkeypatch.context() as trial:  # the trial commits under its GPU's fingerprints
                trial.setattr(artifacts, "runtime", lambda device: on_a_gpu)
                config = experiment.cell_config(unit["cell"], unit["grid"])
                folder = tmp_path / "built"
                folder.mkdir(exist_ok=True)
                (folder / "stage.json").write_text("{}")
                assert store.publish_folder(folder, config.model, config.corpus, "reward",
                                            stage_fingerprints(config)["reward"])
        return failures

    monkeypatch.setattr(driver, "fit_phase", fit_phase)
    (lane,) = phases(experiment, "grid")
    failed = run_lane(experiment, lane, 0, root.uri, store.root.uri, log=lambda line: None)
    assert len(given["prepare"]) == 2
    assert sorted((u["grid"]["sft.learning_rate"], u["grid"]["ppo.algorithm"]) for u in given["grid"]) == [
        (0.002, "grpo"), (0.002, "ppo")]
    assert sorted((f["state"], f["params"]["sft.learning_rate"]) for f in failed) == [
        ("failed", 0.001), ("skipped", 0.001), ("skipped", 0.001)]


def test_a_prepare_whose_training_check_failed_is_a_failure_of_its_phase_without_retries(tmp_path, monkeypatch):
    """A collapsed SFT fails the same way on every retry with its seed: the trial ends with the
    check in its last result (no error for Tune to retry), and the phase records it."""
    from types import SimpleNamespace

    from slmrl_ray.tuning import experiment as driver
    from slmrl_ray.tuning.experiment import unit_key

    experiment = load_tune_config(write(tmp_path, (
        f"name: x\nstorage_path: {tmp_path / 'runs'}\ncells: [pythia-70m/tinystories]\n"
        "grid: {sft.learning_rate: [0.001, 0.002]}\n")))
    prepare = phases(experiment, "grid")[0][0]
    low, high = ({"cell": "pythia-70m/tinystories", "grid": {"sft.learning_rate": rate}} for rate in (0.001, 0.002))
    collapsed = "TrainingCheckError: sft: the LoRA weights did not change during training"
    results = [SimpleNamespace(error=None, config={"unit": low}, path="/x/cell_trial_1",
                               metrics={"cell": low["cell"], "prepare_failed": collapsed}),
               SimpleNamespace(error=None, config={"unit": high}, path="/x/cell_trial_2",
                               metrics={"cell": high["cell"], "stages_done": 3})]
    tuner = SimpleNamespace(fit=lambda: type("Results", (list,), {"num_errors": 0})(results))
    monkeypatch.setattr(driver, "_tuner", lambda *args: (tuner, False))
    root = str(tmp_path / "runs" / "x")
    (failure,) = driver.fit_phase(experiment, prepare, 0, root, root + "/artifacts", [low, high], log=lambda line: None)
    assert (failure["unit"], failure["state"], failure["error"], failure["trial_id"]) == (
        unit_key(low), "failed", collapsed, "cell_trial_1")


def test_stale_trial_scratch_is_pruned_and_a_live_trials_is_kept(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    from slmrl_ray.tuning import trial

    monkeypatch.setenv("SLMRL_RAY_SCRATCH", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owners = {"killed": int(dead.stdout), "running": os.getppid(), "previous": os.getpid()}
    for name, pid in owners.items():  # a killed actor's, another live trial's, this reused actor's last one
        folder = tmp_path / "slmrl-ray" / "exp" / name
        (folder / "ppo").mkdir(parents=True)
        (folder / trial.OWNER).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "trial": name}))
    elsewhere = tmp_path / "slmrl-ray" / "exp" / "other-node"
    elsewhere.mkdir()
    (elsewhere / trial.OWNER).write_text(json.dumps({"pid": owners["killed"], "host": "another-node"}))
    folder = trial.scratch_dir("exp", "new")
    left = sorted(p.name for p in (tmp_path / "slmrl-ray" / "exp").iterdir())
    assert left == ["new", "other-node", "running"] and folder.name == "new"
