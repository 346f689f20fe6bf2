"""A search's budgets.yaml and a grid that reads it: fast, no Ray session, no training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slmrl_ray.config import ConfigError
from slmrl_ray.tuning.budgets import BUDGETS
from slmrl_ray.tuning.budgets_writer import write_budgets
from slmrl_ray.tuning.config import experiment_from_dict, load_tune_config
from slmrl_ray.tuning.experiment import MANIFEST, experiment_root, write_manifest

CELLS = ("pythia-70m/tinystories", "pythia-70m/wikitext", "smollm2-135m/wikitext")


def search_record(cell: str, trial_id: str, objective: float, test_delta: float, params: dict,
                  validation: bool = True, diverged: bool = False) -> dict:
    """A search trial's record as `CellRecord.write` leaves it (only what budgets and the report read)."""
    model, corpus = cell.split("/")
    evaluation = {"delta_reward": test_delta, "analytical_win_rate": 0.5}
    if validation:
        evaluation["validation"] = {"delta_reward": objective}
    return {"experiment": "s", "kind": "search", "trial_id": trial_id, "model": model, "corpus": corpus,
            "params": params, "objective": objective, "diverged": diverged, "evaluation": evaluation,
            "fingerprints": {"data": "d", "sft": "s", "reward": "r", "ppo": trial_id},
            "finished_at": "2026-11-30T12:00:00+0000", "versions": {"slmrl-ray": "0.1.0", "torch": "2.13.0"}}


def tiny_params(kl: float, lr: float, steps: int) -> dict:
    return {"ppo.init_kl_coef": kl, "ppo.learning_rate": lr, "ppo.steps": steps}


def finished_search(tmp_path: Path, cell_overrides: dict | None = None):
    """A finished 3-cell search's storage (its manifest and its trials' records), and the records."""
    experiment = experiment_from_dict({
        "name": "s", "storage_path": str(tmp_path / "runs"), "cells": list(CELLS),
        "pipeline": {"preset": "tiny", "cell_overrides": cell_overrides or {}},
        "search": {"steps": [20, 30], "validation_fraction": 0.25, "seed": 7},
    })
    root = experiment_root(experiment)
    write_manifest(experiment, "search", root)
    first, second, _ = CELLS
    records = [
        # The best on the reported (test) share, not on the validation share: never the choice.
        search_record(first, "t-test", 0.2, 5.0, tiny_params(0.05, 1e-3, 20)),
        search_record(first, "t-best", 0.6, -1.0, tiny_params(0.11, 3e-4, 30)),
        # A higher objective, but not measured on a validation share (an older record): ignored.
        search_record(first, "t-old", 0.9, 0.9, tiny_params(0.2, 1e-4, 20), validation=False),
        search_record(first, "t-diverged", -1000.0, -1000.0, tiny_params(0.3, 2e-3, 30), diverged=True),
        search_record(second, "t-nan", float("nan"), 0.1, tiny_params(0.1, 1e-4, 20)),
    ]
    for record in records:
        root.child("results", f"{record['trial_id']}.json").write_json(record)
    return root, records


@pytest.fixture
def search(tmp_path):
    return finished_search(tmp_path)


def test_a_search_report_writes_each_cells_best_trial_by_its_validation_objective(search, tmp_path):
    root, records = search
    path = write_budgets(root.child(MANIFEST).read_json(), root.uri, records, tmp_path / "report")
    assert path.name == BUDGETS and path.read_text().startswith("# Each cell's settings chosen by the search `s`")
    budgets = yaml.safe_load(path.read_text())
    assert (budgets["search"], budgets["storage"], budgets["validation_fraction"], budgets["seed"]) == (
        "s", root.uri, 0.25, 7)
    assert set(budgets["written_with"]) == {"slmrl-ray", "torch", "transformers", "trl", "peft", "ray", "optuna"}
    entry = budgets["cells"]["pythia-70m/tinystories"]
    assert entry["trial_id"] == "t-best" and entry["objective"] == 0.6
    assert entry["overrides"] == ["ppo.init_kl_coef=0.11", "ppo.learning_rate=0.0003", "ppo.steps=30",
                                  "eval.validation_fraction=0.25"]
    assert (entry["search"], entry["storage"], entry["validation_fraction"], entry["seed"]) == ("s", root.uri, 0.25, 7)
    assert entry["versions"] == {"slmrl-ray": "0.1.0", "torch": "2.13.0"} and entry["fingerprints"]["ppo"] == "t-best"
    assert entry["eval_prompts"]["eval.seed"] and "data.num_documents" in entry["eval_prompts"]
    # A cell whose only trial has no objective, and one without any trial, get no budget, and say why.
    assert sorted(budgets["without_budget"]) == ["pythia-70m/wikitext", "smollm2-135m/wikitext"]
    # A grid's report writes none.
    grid = {**root.child(MANIFEST).read_json(), "kind": "grid"}
    assert write_budgets(grid, root.uri, records, tmp_path / "grid-report") is None
    assert not (tmp_path / "grid-report").exists()


def test_the_report_step_puts_budgets_yaml_next_to_registry_json(search, monkeypatch):
    from slmrl_ray.tuning import report
    from slmrl_ray.tuning.experiment import write_report

    def tables_and_registry(records, out_dir):  # the tables and plots are report.py's own tests'
        (out_dir / "registry.json").write_text("{}")
        return {"rows": []}

    monkeypatch.setattr(report, "write_report", tables_and_registry)
    root, _ = search
    write_report(root, log=lambda line: None)
    assert sorted(root.child("report").list()) == [BUDGETS, "registry.json"]
    assert "t-best" in root.child("report", BUDGETS).read_text()


def grid_config(tmp_path: Path, pipeline: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"name: g\ncells: [pythia-70m/tinystories, pythia-70m/wikitext]\npipeline: {pipeline}\n")
    return path


def test_a_grid_reads_the_search_budgets_into_its_cells_with_provenance(search, tmp_path):
    root, records = search
    for folder in (Path(root.path) / "report", tmp_path / "copied"):  # as its report step left it, and a copy
        write_budgets(root.child(MANIFEST).read_json(), root.uri, records, folder)
    # The search's folder (its report/budgets.yaml), or the file itself, relative to the tune config.
    for source in (root.uri, "copied/budgets.yaml", "copied"):
        experiment = load_tune_config(grid_config(tmp_path, f"{{preset: tiny, cell_overrides_from: {source}}}"))
        config = experiment.cell_config("pythia-70m/tinystories")
        assert (config.ppo.init_kl_coef, config.ppo.learning_rate, config.ppo.steps) == (0.11, 3e-4, 30)
        assert config.eval.validation_fraction == 0.25  # the grid reports only the prompts the search did not tune on
        assert experiment.cell_config("pythia-70m/wikitext").eval.validation_fraction == 0.0  # no budget: untouched
        provenance = experiment.cell_provenance("pythia-70m/tinystories")
        assert (provenance["search"], provenance["storage"], provenance["trial_id"], provenance["objective"]) == (
            "s", root.uri, "t-best", 0.6)
        assert provenance["budgets"].endswith(BUDGETS) and provenance["versions"]["torch"] == "2.13.0"
        assert experiment.cell_provenance("pythia-70m/wikitext") is None
    # What experiment.json keeps holds the settings: `resume` reads no budgets file.
    assert "cell_overrides_from" not in experiment.raw["pipeline"]
    (tmp_path / "copied" / BUDGETS).unlink()
    again = experiment_from_dict(experiment.raw, base=experiment.base)
    assert again.cell_config("pythia-70m/tinystories") == experiment.cell_config("pythia-70m/tinystories")


def test_a_cell_record_and_the_registry_say_where_the_cells_settings_came_from(tmp_path):
    from slmrl_ray.config import load_config
    from slmrl_ray.storage import Storage
    from slmrl_ray.tuning.report import registry
    from slmrl_ray.tuning.trial import CellRecord

    provenance = {"overrides": ["ppo.steps=30"], "search": "s", "trial_id": "t-best"}
    record = object.__new__(CellRecord)  # what `__init__` asks Ray for is not under test
    record.experiment, record.kind, record.trial_id, record.sampled, record.resumed_step = "g", "grid", "t1", {}, 0
    record.config = load_config(preset="tiny", overrides=["model=pythia-70m", "corpus=tinystories"])
    record.cell_overrides, record.started, record.resources, record.gpu_ids = provenance, 0.0, {}, []
    record.write(str(tmp_path), {"eval": {"delta_reward": 1.0, "analytical_win_rate": 0.6}}, {}, None, diverged=False)
    written = Storage.from_uri(str(tmp_path)).child("results", "t1.json").read_json()
    assert written["cell_overrides"] == provenance and "transformers" in written["versions"]
    assert registry([written])["cells"]["pythia-70m/tinystories"]["cell_overrides"] == provenance


def test_a_budgets_file_that_is_missing_or_malformed_is_a_config_error(search, tmp_path):
    root, records = search
    with pytest.raises(ConfigError, match=r"pipeline.cell_overrides_from: no budgets.yaml at .*nowhere"):
        load_tune_config(grid_config(tmp_path, "{preset: tiny, cell_overrides_from: nowhere}"))
    with pytest.raises(ConfigError, match="pipeline.cell_overrides_from: expected a path or URI"):
        load_tune_config(grid_config(tmp_path, "{preset: tiny, cell_overrides_from: [a, b]}"))
    path = write_budgets(root.child(MANIFEST).read_json(), root.uri, records, tmp_path / "b")
    text = path.read_text()
    bad = {
        "typo.yaml": (text.replace("    trial_id:", "    trial:", 1),
                      r"from: .*typo.yaml: cells.pythia-70m/tinystories.trial: unknown key \(known keys:"),
        "no-search.yaml": (text.replace("\nsearch: s\n", "\n", 1), "no-search.yaml: search: required key is missing"),
        "version.yaml": (text.replace("version: 1", "version: 7"), r"version.yaml: version 7 \(this slmrl-ray reads"),
        "cell.yaml": (text.replace("pythia-70m/tinystories:", "gpt-2/tinystories:"),
                      "pipeline.cell_overrides.gpt-2/tinystories: not a model/corpus cell .* read from .*cell.yaml"),
        "key.yaml": (text.replace("ppo.steps=30", "ppo.stepz=30"),
                     r"pipeline.cell_overrides.pythia-70m/tinystories: ppo.stepz: unknown key .* \(read from .*key.yaml"),
        "yaml.yaml": ("cells: [", "yaml.yaml: cannot read it"),
    }
    for name, (body, message) in bad.items():
        (tmp_path / "b" / name).write_text(body)
        with pytest.raises(ConfigError, match=message):
            load_tune_config(grid_config(tmp_path, f"{{preset: tiny, cell_overrides_from: b/{name}}}"))


def test_a_cell_set_both_by_hand_and_by_the_budgets_or_on_other_prompts_is_refused(search, tmp_path):
    root, records = search
    write_budgets(root.child(MANIFEST).read_json(), root.uri, records, tmp_path / "b")
    both = "{preset: tiny, cell_overrides_from: b, cell_overrides: {pythia-70m/tinystories: [ppo.steps=9]}}"
    with pytest.raises(ConfigError, match=r"pipeline.cell_overrides.pythia-70m/tinystories: also in .*budgets.yaml"):
        load_tune_config(grid_config(tmp_path, both))
    # Other evaluation prompts (or another split): the grid's reported share could hold prompts the search tuned on.
    for change, key in (("eval.num_prompts=7", "eval.num_prompts"), ("data.seed=3", "data.seed"),
                        ("eval.seed=5", "eval.seed")):
        with pytest.raises(ConfigError, match=f"pipeline.cell_overrides.pythia-70m/tinystories: the search s tuned on "
                                              f"other evaluation prompts or another split .*{key}"):
            load_tune_config(grid_config(tmp_path, f"{{preset: tiny, cell_overrides_from: b, overrides: [{change}]}}"))


@pytest.mark.parametrize("entry, message", [
    ("{overrides: [ppo.steps=60]}", r"pipeline.cell_overrides.pythia-70m/wikitext.search: name the search run"),
    ("{overrides: [ppo.steps=60], search: ''}", r"pipeline.cell_overrides.pythia-70m/wikitext.search: name the search"),
    ("{overrides: [ppo.steps=60], search: s, trial: t1}", r"pipeline.cell_overrides.pythia-70m/wikitext.trial: unknown"),
    ("{search: s}", r"pipeline.cell_overrides.pythia-70m/wikitext.overrides: required key is missing"),
])
def test_a_hand_written_cell_override_names_its_search(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        load_tune_config(grid_config(tmp_path, f"{{preset: tiny, cell_overrides: {{pythia-70m/wikitext: {entry}}}}}"))
    named = "{preset: tiny, cell_overrides: {pythia-70m/wikitext: {overrides: [ppo.steps=60], search: my-search}}}"
    experiment = load_tune_config(grid_config(tmp_path, named))
    assert experiment.cell_config("pythia-70m/wikitext").ppo.steps == 60
    assert experiment.cell_provenance("pythia-70m/wikitext")["search"] == "my-search"
    bare = load_tune_config(grid_config(tmp_path, "{preset: tiny, cell_overrides: {pythia-70m/wikitext: [ppo.steps=61]}}"))
    assert bare.cell_config("pythia-70m/wikitext").ppo.steps == 61  # the older form loads, naming no search
    assert bare.config.pipeline.cell_overrides["pythia-70m/wikitext"].search is None
    assert bare.raw["pipeline"]["cell_overrides"] == {"pythia-70m/wikitext": ["ppo.steps=61"]}  # kept as written


def test_a_search_cells_own_settings_come_first_in_its_budget_with_their_provenance(tmp_path):
    """The budget runs the cell as its chosen trial ran: a reward-model budget of the search
    config's own entry included, and said where it came from."""
    own = {"pythia-70m/tinystories": {"overrides": ["reward.max_steps=9", "ppo.steps=5"], "search": "rm-grid"}}
    root, records = finished_search(tmp_path, own)
    write_budgets(root.child(MANIFEST).read_json(), root.uri, records, Path(root.path) / "report")
    experiment = load_tune_config(grid_config(tmp_path, f"{{preset: tiny, cell_overrides_from: {root.uri}}}"))
    entry = experiment.config.pipeline.cell_overrides["pythia-70m/tinystories"]
    assert entry.overrides == ("reward.max_steps=9", "ppo.init_kl_coef=0.11", "ppo.learning_rate=0.0003",
                               "ppo.steps=30", "eval.validation_fraction=0.25")  # the sampled steps, not 5
    assert entry.inherited.search == "rm-grid" and not entry.hand_picked
    config = experiment.cell_config("pythia-70m/tinystories")
    assert (config.reward.max_steps, config.ppo.steps) == (9, 30)
    # A hand pick in the search config stays one in the grid: the shipped-config test sees it.
    bare = finished_search(tmp_path / "bare", {"pythia-70m/tinystories": ["reward.max_steps=9"]})
    write_budgets(bare[0].child(MANIFEST).read_json(), bare[0].uri, bare[1], tmp_path / "bare-budgets")
    grid = load_tune_config(grid_config(tmp_path, "{preset: tiny, cell_overrides_from: bare-budgets}"))
    assert grid.config.pipeline.cell_overrides["pythia-70m/tinystories"].hand_picked
