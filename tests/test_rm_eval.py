"""`slmrl-ray rm-eval`: RewardBench's aggregation on hand-computed numbers, then the command on the
tiny pipeline's reward model (a generated four-category preference set, the run's held-out pairs,
bad inputs)."""

from __future__ import annotations

import json

import pytest
import torch

from slmrl_ray.cli import main
from slmrl_ray.data import PreferencePair, load_jsonl
from slmrl_ray.rewards import pipeline_scorer
from slmrl_ray.rm_eval import REWARDBENCH_CATEGORIES, aggregate, subset_results


def test_aggregate_weights_subsets_like_rewardbench():
    accuracies = {"alpacaeval-easy": 0.9, "mt-bench-easy": 0.5, "mt-bench-hard": 0.4, "refusals-dangerous": 0.8,
                  "math-prm": 0.6, "hep-python": 1.0, "hep-go": 0.7, "custom": 0.1}
    counts = {subset: 10 for subset in accuracies}  # RewardBench's fixed weights win over these
    scores, average = aggregate(accuracies, counts, REWARDBENCH_CATEGORIES)
    assert scores["Chat"] == pytest.approx((0.9 * 100 + 0.5 * 28) / 128)  # 0.8125
    assert scores["Chat Hard"] == pytest.approx(0.4) and scores["Safety"] == pytest.approx(0.8)
    # math-prm weighs 984 (its 447 pairs upweighted), each hep-* subset 164.
    assert scores["Reasoning"] == pytest.approx((0.6 * 984 + 1.0 * 164 + 0.7 * 164) / 1312)  # 0.6625
    assert average == pytest.approx((0.8125 + 0.4 + 0.8 + 0.6625) / 4)  # 0.66875
    assert "custom" not in str(scores)

    # On the full set, Reasoning is (math-prm + the mean of the six hep-* subsets) / 2.
    hep = {f"hep-{lang}": 1.0 for lang in ("cpp", "go", "java", "js", "python", "rust")}
    scores, average = aggregate({"math-prm": 0.5, **hep}, {}, REWARDBENCH_CATEGORIES)
    assert scores == {"Reasoning": pytest.approx(0.75)} and average == pytest.approx(0.75)

    # A custom mapping: subsets RewardBench does not know weigh their pair counts; a category
    # with no subset present is left out of the scores and the average.
    scores, average = aggregate({"custom": 0.1, "other": 1.0}, {"custom": 3, "other": 1},
                                {"Mine": ["custom", "other"], "Empty": ["absent"]})
    assert scores == {"Mine": pytest.approx((0.1 * 3 + 1.0) / 4)} and average == pytest.approx(0.325)
    assert aggregate({}, {}, REWARDBENCH_CATEGORIES) == ({}, None)


def test_subset_results_count_ties_as_wrong():
    results = subset_results(torch.tensor([1.0, 2.0, 3.0, 3.0]), torch.tensor([0.0, 3.0, 3.0, 1.0]),
                             ["a", "a", "b", "b"])
    assert results["a"] == {"accuracy": 0.5, "count": 2, "ties": 0, "mean_margin": 0.0}
    assert results["b"] == {"accuracy": 0.5, "count": 2, "ties": 1, "mean_margin": 1.0}


# subset -> (chunk of 10 held-out pairs, which of its pairs are swapped so rejected becomes chosen)
GENERATED = {
    "alpacaeval-easy": (0, set()),
    "mt-bench-med": (1, {0, 1, 2}),
    "mt-bench-hard": (0, set(range(10))),  # alpacaeval-easy swapped
    "llmbar-natural": (2, {1, 3, 5, 7}),
    "refusals-dangerous": (3, set()),
    "xstest-should-respond": (1, {4, 5, 6, 7}),
    "math-prm": (2, set(range(10))),
    "hep-python": (3, {0}),
    "hep-go": (0, {2, 9}),
    "not-in-rewardbench": (4, {0, 1}),
}
WEIGHTS = {"alpacaeval-easy": 100, "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100,
           "refusals-dangerous": 100, "xstest-should-respond": 154, "math-prm": 984, "hep-python": 164, "hep-go": 164}


def _generated_set(heldout: list[PreferencePair], per_subset: int) -> list[dict]:
    rows = []
    for subset, (chunk, swapped) in GENERATED.items():
        for i, pair in enumerate(heldout[10 * chunk : 10 * chunk + per_subset]):
            chosen, rejected = (pair.rejected, pair.chosen) if i in swapped else (pair.chosen, pair.rejected)
            rows.append({"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "subset": subset, "id": i})
    return rows


def test_rm_eval_on_a_four_category_set_matches_per_pair_scores(neox_run, tmp_path, capsys):
    config, paths, _ = neox_run
    heldout = load_jsonl(paths.data / "pairs_heldout.jsonl", PreferencePair)
    dataset = tmp_path / "prefs.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in _generated_set(heldout, 10)))
    out = tmp_path / "rm_eval.json"
    code = main(["rm-eval", "--run", str(paths.root), "--reward-model", str(paths.reward / "model"),
                 "--dataset", str(dataset), "--max-per-subset", "8", "--device", "cpu", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())

    # What the categories must be, from this test's own per-pair scores of the first 8 pairs per subset.
    rows = _generated_set(heldout, 8)
    scorer = pipeline_scorer(paths.reward / "model", config, torch.device("cpu"))
    margins = (scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
               - scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])).tolist()
    expected = {s: sum(m > 0 for m, r in zip(margins, rows) if r["subset"] == s) / 8 for s in GENERATED}
    def section(*subsets):
        return sum(expected[s] * WEIGHTS[s] for s in subsets) / sum(WEIGHTS[s] for s in subsets)
    categories = {"Chat": section("alpacaeval-easy", "mt-bench-med"),
                  "Chat Hard": section("mt-bench-hard", "llmbar-natural"),
                  "Safety": section("refusals-dangerous", "xstest-should-respond"),
                  "Reasoning": section("math-prm", "hep-python", "hep-go")}

    pipeline, judge, external = report["models"]  # the run's reward model and its judge, then --reward-model
    assert (pipeline["kind"], pipeline["name"]) == ("pipeline", "pythia-70m/tinystories reward/model")
    assert (judge["kind"], judge["name"]) == ("pipeline", "pythia-70m/tinystories reward/judge")
    assert (external["kind"], external["source"]) == ("external", str(paths.reward / "model"))
    assert {s: r["accuracy"] for s, r in pipeline["subsets"].items()} == pytest.approx(expected)
    assert all(r["count"] == 8 for r in pipeline["subsets"].values())
    assert pipeline["subsets"]["mt-bench-hard"]["accuracy"] == pytest.approx(
        1 - pipeline["subsets"]["alpacaeval-easy"]["accuracy"])  # the same pairs, swapped
    assert pipeline["subsets"]["alpacaeval-easy"]["accuracy"] > 0.5  # the tiny RM learned the preference
    assert pipeline["categories"] == pytest.approx(categories)
    assert pipeline["average"] == pytest.approx(sum(categories.values()) / 4)
    assert pipeline["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))

    assert set(report) == {"dataset", "categories", "weights", "uncategorized", "tie_rule", "device",
                           "settings", "models"}
    assert report["dataset"] == {"source": str(dataset), "name": None, "split": "filtered", "subset_column": "subset",
                                 "max_per_subset": 8, "pairs": 8 * len(GENERATED)}
    assert report["uncategorized"] == ["not-in-rewardbench"] and report["weights"]["not-in-rewardbench"] == 8
    assert report["weights"]["math-prm"] == 984 and report["categories"]["Reasoning"][0] == "math-prm"
    for model in report["models"]:
        assert set(model) == {"name", "kind", "source", "revision", "accuracy", "subsets", "categories", "average"}
        assert list(model["subsets"]) == list(GENERATED)
        assert set(model["subsets"]["math-prm"]) == {"accuracy", "count", "ties", "mean_margin"}

    printed = capsys.readouterr().out
    assert "| reward model | Chat | Chat Hard | Safety | Reasoning | Average |" in printed
    cells = [f"{100 * categories[c]:.2f}" for c in ("Chat", "Chat Hard", "Safety", "Reasoning")]
    assert f"| pythia-70m/tinystories reward/model | {' | '.join(cells)} |" in printed
    assert "| not-in-rewardbench | - | 8 |" in printed


def test_rm_eval_defaults_to_the_runs_heldout_pairs_with_its_judge(run_copy, tmp_path, capsys):
    config, paths = run_copy
    assert (paths.reward / "judge").is_dir()  # the tiny preset trains a split judge
    out = tmp_path / "heldout.json"
    assert main(["rm-eval", "--run", str(paths.root), "--device", "cpu", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    metrics = json.loads((paths.reward / "metrics.json").read_text())
    assert report["dataset"]["source"] == str(paths.data / "pairs_heldout.jsonl")
    assert report["dataset"]["pairs"] == metrics["heldout_pairs"]
    assert report["categories"] == {"tinystories": ["tinystories"]}
    model, judge = report["models"]
    assert judge["name"] == "pythia-70m/tinystories reward/judge"
    for row, prefix in ((model, ""), (judge, "judge_")):
        # The reward stage's held-out accuracy also counts a tie as wrong: the same number.
        assert row["subsets"]["tinystories"]["accuracy"] == pytest.approx(metrics[f"{prefix}heldout_accuracy"])
        assert row["categories"]["tinystories"] == row["average"] == row["accuracy"]
        assert row["subsets"]["tinystories"]["mean_margin"] == pytest.approx(metrics[f"{prefix}heldout_margin"],
                                                                           rel=1e-4)
    assert "| reward model | tinystories | Average |" in capsys.readouterr().out


def test_rm_eval_bad_inputs_give_one_line_errors(neox_run, tmp_path, capsys):
    _, paths, _ = neox_run
    run = ["rm-eval", "--run", str(paths.root), "--device", "cpu"]
    no_rejected = tmp_path / "no_rejected.jsonl"
    no_rejected.write_text(json.dumps({"prompt": "p", "chosen": "a", "subset": "s"}) + "\n")
    no_subset = tmp_path / "no_subset.json"
    no_subset.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    for argv, message in (
        ([*run, "--dataset", str(no_rejected)], "missing column 'rejected'"),
        ([*run, "--dataset", str(no_subset)], "missing column 'subset'"),
        ([*run, "--dataset", str(tmp_path / "absent.jsonl")], "absent.jsonl: no such file"),
        ([*run, "--categories", str(tmp_path / "absent.yaml")], "absent.yaml: no such category file"),
        (["rm-eval", "--run", str(tmp_path)], "no finished reward stage"),
        (["rm-eval", "--dataset", str(no_rejected)], "give at least one --reward-model or --run"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("slmrl-ray: rm-eval: ") and message in err and "\n" not in err
    bad_mapping = tmp_path / "categories.yaml"
    bad_mapping.write_text("Chat: alpacaeval-easy\n")
    assert main([*run, "--categories", str(bad_mapping)]) == 1
    assert "expected a mapping of category -> list of subset names" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a revision pins the --reward-model before it
        main(["rm-eval", "--revision", "main", "--reward-model", "x"])
