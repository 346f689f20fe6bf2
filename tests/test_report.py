"""The tuning report from synthetic cell records: selection, table files, plots and registry (no Ray)."""

from __future__ import annotations

import csv
import json

import pytest

from slmrl_ray.storage import join_uri
from slmrl_ray.tuning.report import (
    format_summary,
    plot_rewards,
    plot_search_landscape,
    plot_win_rates,
    registry,
    results_table,
    select_cells,
    write_report,
    write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
S3_QUERY = "?endpoint_override=h:1&scheme=http"


def policy_metrics(reward_mean: float, perplexity: float, shift: float) -> dict:
    """One policy's block of `evaluation_results.json`; `shift` makes every text metric distinct."""
    return {
        "perplexity": perplexity,
        "reward": {"mean": reward_mean, "std": 1.25, "min": reward_mean - 2, "max": reward_mean + 2, "n": 32},
        "distinct_1": 0.31 + shift, "distinct_2": 0.62 + shift, "distinct_3": 0.8 + shift,
        "rouge1": 0.21 + shift, "rouge2": 0.05 + shift, "rougeL": 0.17 + shift,
        "bleu": 2.5 + shift, "precision_4gram": 0.01 + shift, "response_chars_mean": 200.0,
    }


def make_record(
    model: str = "pythia-70m",
    corpus: str = "tinystories",
    *,
    kind: str = "grid",
    trial_id: str = "t_00000",
    objective: float | None = None,
    diverged: bool = False,
    finished_at: str = "2026-11-22T10:00:00+0000",
    params: dict | None = None,
    ppo_reward: float = -3.5,
) -> dict:
    evaluation = None
    if not diverged:
        evaluation = {
            "model": model, "corpus": corpus, "num_prompts": 32,
            "delta_reward": ppo_reward + 4.0, "analytical_win_rate": 0.607,
            "paired_win_rate": {"win_rate": 0.625, "ci_low": 0.469, "ci_high": 0.781},
            "sft": policy_metrics(-4.0, 6.0, 0.0), "ppo": policy_metrics(ppo_reward, 6.5, 0.1),
            "judge": {"delta": 0.3, "paired_win_rate": {"win_rate": 0.6, "ci_low": 0.52, "ci_high": 0.68},
                      "heldout_accuracy": 0.9, "heldout_pairs": 120},
            "gold": {"metric": "rougeL_f1", "sft": 0.17, "ppo": 0.27, "delta": 0.1,
                     "paired_win_rate": {"win_rate": 0.7, "ci_low": 0.61, "ci_high": 0.79}},
        }
    return {
        "experiment": "tiny-" + kind, "kind": kind, "trial_id": trial_id,
        "model": model, "corpus": corpus,
        "params": params if params is not None else {},
        "objective": objective, "diverged": diverged, "evaluation": evaluation,
        "metrics": {"sft": {"heldout_perplexity": 6.1}, "reward": {"heldout_accuracy": 0.98},
                    "ppo": {"kl_last": 3.2, "reward_first": -4.2, "reward_last": -3.5}},
        "fingerprints": {"data": "d1", "sft": "s1", "reward": "r1", "ppo": "p-" + trial_id, "eval": "e1"},
        "wall_time_s": {"ppo": 9.9, "eval": 1.2},
        "finished_at": finished_at,
    }


def search_record(trial_id: str, objective: float | None, kl: float, lr: float, **kwargs) -> dict:
    return make_record(kind="search", trial_id=trial_id, objective=objective,
                       params={"ppo.init_kl_coef": kl, "ppo.learning_rate": lr}, **kwargs)


# -- join_uri -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "parts", "expected"),
    [
        ("s3://b/x" + S3_QUERY, ("model",), "s3://b/x/model" + S3_QUERY),
        ("s3://b/x/" + S3_QUERY, ("/model/",), "s3://b/x/model" + S3_QUERY),
        ("s3://b/x", ("a", "b"), "s3://b/x/a/b"),
        ("/tmp/run/sft", ("model",), "/tmp/run/sft/model"),
        ("file:///tmp/run/sft/", ("model",), "file:///tmp/run/sft/model"),
    ],
)
def test_join_uri_appends_path_before_the_query_string(uri, parts, expected):
    assert join_uri(uri, *parts) == expected


# -- selection ------------------------------------------------------------------------------


def test_search_picks_the_best_non_diverged_objective():
    records = [
        search_record("low", 0.2, 0.1, 1e-3),
        search_record("best", 0.7, 0.05, 3e-4),
        search_record("none", None, 0.2, 1e-4),
        search_record("blewup", 9.0, 0.01, 1e-2, diverged=True),
    ]
    (cell,) = select_cells(records)
    assert cell["trial_id"] == "best"


def test_search_none_objective_never_beats_a_number_and_ties_go_to_the_newest():
    late = "2026-11-23T09:00:00+0000"
    (cell,) = select_cells([search_record("scored", -5.0, 0.1, 1e-3),
                            search_record("unscored", None, 0.1, 1e-3, finished_at=late)])
    assert cell["trial_id"] == "scored"
    (cell,) = select_cells([search_record("old", 0.5, 0.1, 1e-3),
                            search_record("new", 0.5, 0.2, 1e-3, finished_at=late),
                            search_record("older", 0.5, 0.3, 1e-3, finished_at="2026-11-21T09:00:00+0000")])
    assert cell["trial_id"] == "new"


def test_search_whose_trials_all_diverged_still_yields_its_cell():
    (cell,) = select_cells([search_record("a", 1.0, 0.1, 1e-3, diverged=True),
                            search_record("b", 2.0, 0.1, 1e-2, diverged=True)])
    assert cell["diverged"]
    (row,) = results_table([cell])
    assert row["reason"] == "every search trial diverged"


def test_grid_picks_the_newest_record_even_across_timezones():
    records = [
        make_record(trial_id="first", finished_at="2026-11-22T10:00:00+0000"),
        # 11:30 at +02:00 is 09:30 UTC: older than "first".
        make_record(trial_id="tz", finished_at="2026-11-22T11:30:00+0200"),
        make_record(trial_id="newest", finished_at="2026-11-22T10:00:01+0000"),
    ]
    (cell,) = select_cells(records)
    assert cell["trial_id"] == "newest"


def test_cells_follow_the_study_order_with_unknown_keys_last_alphabetically():
    pairs = [("smollm2-360m", "wikitext"), ("zeta-model", "tinystories"), ("pythia-70m", "wikitext"),
             ("alpha-model", "tinystories"), ("pythia-70m", "tinystories"), ("pythia-70m", "my-corpus"),
             ("pythia-410m", "cnn_dailymail"), ("pythia-160m", "tinystories"), ("smollm2-135m", "tinystories")]
    cells = select_cells([make_record(model, corpus, trial_id=f"{model}-{corpus}") for model, corpus in pairs])
    assert [(c["model"], c["corpus"]) for c in cells] == [
        ("pythia-70m", "tinystories"), ("pythia-70m", "wikitext"), ("pythia-70m", "my-corpus"),
        ("pythia-160m", "tinystories"), ("pythia-410m", "cnn_dailymail"), ("smollm2-135m", "tinystories"),
        ("smollm2-360m", "wikitext"), ("alpha-model", "tinystories"), ("zeta-model", "tinystories"),
    ]


# -- table files ------------------------------------------------------------------------------


@pytest.fixture
def grid_rows() -> list[dict]:
    records = [
        make_record("pythia-70m", "tinystories", trial_id="g1", ppo_reward=-3.5),
        make_record("smollm2-135m", "wikitext", trial_id="g2", ppo_reward=-2.0),
        make_record("pythia-160m", "cnn_dailymail", trial_id="g3", diverged=True),
    ]
    return results_table(select_cells(records))


def test_results_rows_carry_the_extended_text_metrics(grid_rows):
    row = grid_rows[0]
    assert (row["trial_id"], row["reason"], row["params"], row["objective"]) == ("g1", None, {}, None)
    assert row["sft_distinct_1"] == pytest.approx(0.31) and row["ppo_distinct_1"] == pytest.approx(0.41)
    assert row["sft_rouge2"] == pytest.approx(0.05) and row["ppo_rouge2"] == pytest.approx(0.15)
    assert row["ppo_bleu"] == pytest.approx(2.6) and row["ppo_precision_4gram"] == pytest.approx(0.11)
    assert row["paired_win_rate_ci"] == [0.469, 0.781]
    assert row["judge_paired_win_rate_ci"] == [0.52, 0.68] and row["judge_accuracy"] == 0.9
    assert row["gold_delta"] == 0.1 and row["gold_paired_win_rate_ci"] == [0.61, 0.79]
    assert grid_rows[1]["reason"] == "PPO diverged" and "sft_perplexity" not in grid_rows[1]


def test_csv_has_one_row_per_cell_with_results_and_the_ci_split(grid_rows, tmp_path):
    write_results(grid_rows, tmp_path)
    with (tmp_path / "results.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["model"], r["corpus"]) for r in table] == [("pythia-70m", "tinystories"), ("smollm2-135m", "wikitext")]
    for column in ("trial_id", "objective", "sft_perplexity", "ppo_reward", "ppo_reward_std", "delta_reward",
                   "win_rate", "paired_win_rate", "paired_win_rate_ci_low", "paired_win_rate_ci_high",
                   "sft_distinct_2", "ppo_rougeL", "ppo_bleu", "ppo_precision_4gram"):
        assert column in table[0], column
    assert "paired_win_rate_ci" not in table[0] and "reason" not in table[0]
    assert float(table[0]["paired_win_rate_ci_low"]) == pytest.approx(0.469)
    assert float(table[0]["paired_win_rate_ci_high"]) == pytest.approx(0.781)
    assert float(table[0]["judge_paired_win_rate_ci_low"]) == pytest.approx(0.52)
    assert float(table[0]["gold_paired_win_rate_ci_high"]) == pytest.approx(0.79)
    assert "judge_paired_win_rate_ci" not in table[0] and "gold_paired_win_rate_ci" not in table[0]
    assert float(table[1]["ppo_reward"]) == pytest.approx(-2.0)
    assert float(table[1]["delta_reward"]) == pytest.approx(2.0)
    assert table[0]["objective"] == ""  # grid: no objective


def test_markdown_shows_formatted_numbers_and_lists_diverged_cells_apart(grid_rows, tmp_path):
    write_results(grid_rows, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    table, missing = markdown.split("## Cells without results")
    first = next(line for line in table.splitlines() if line.startswith("| pythia-70m | tinystories |"))
    for text in ("6.00", "6.50", "-4.000 ± 1.250", "-3.500 ± 1.250", "+0.500", "60.7%",
                 "62.5% (46.9%-78.1%)", "0.310/0.620", "0.410/0.720", "0.310/0.150/0.270", "2.60",
                 "| +0.100 | +0.300 (52.0%-68.0%) | 0.9 | 0.98 |"):
        assert text in first, text
    assert "pythia-160m" not in table  # never as a row of numbers
    assert "- pythia-160m / cnn_dailymail: PPO diverged (trial g3)" in missing
    assert "objective" not in table.splitlines()[2]  # no search columns for a grid
    assert json.loads((tmp_path / "results.json").read_text()) == grid_rows


def test_search_table_shows_objective_and_chosen_parameters():
    rows = results_table(select_cells([search_record("s1", 0.42, 0.05, 3e-4), search_record("s2", 0.1, 0.2, 1e-3)]))
    summary = format_summary(rows)
    header, _, line = summary.splitlines()[:3]
    assert header.endswith("| objective | ppo.init_kl_coef | ppo.learning_rate |")
    assert line.endswith("| 0.42 | 0.05 | 0.0003 |")
    assert "Cells without results" not in summary


def test_grid_variants_keep_a_row_each_and_the_registry_takes_the_best(tmp_path):
    records = [make_record(trial_id=f"t{i}", params={"ppo.algorithm": algorithm}, ppo_reward=reward)
               for i, (algorithm, reward) in enumerate((("ppo", -3.5), ("grpo", -3.0), ("rloo", -3.8)))]
    records.append(make_record(trial_id="old", params={"ppo.algorithm": "grpo"}, ppo_reward=-1.0,
                               finished_at="2026-11-21T10:00:00+0000"))  # an older grpo trial: replaced
    cells = select_cells(records)
    assert sorted(c["trial_id"] for c in cells) == ["t0", "t1", "t2"]
    lines = format_summary(results_table(cells)).splitlines()
    assert lines[0].endswith("| ppo.algorithm |")
    assert sorted(line.rsplit("|", 2)[1].strip() for line in lines[2:5]) == ["grpo", "ppo", "rloo"]
    entry = registry(cells)["cells"]["pythia-70m/tinystories"]
    assert entry["ppo"]["trial_id"] == "t1" and entry["ppo"]["params"] == {"ppo.algorithm": "grpo"}
    assert write_report(records, tmp_path)["cells_with_results"] == 3


def test_unfinished_cell_is_listed_with_its_reason():
    record = make_record(trial_id="u1")
    record["evaluation"] = None
    (row,) = results_table([record])
    assert row["reason"] == "no evaluation (the trial did not finish)"
    assert format_summary([row]).startswith("No cell has results yet.")


# -- registry ---------------------------------------------------------------------------------


def test_registry_names_stages_by_fingerprint_never_by_uri_and_leaves_out_diverged_cells():
    records = [
        search_record("best", 0.7, 0.05, 3e-4, ppo_reward=-3.0),
        search_record("worse", 0.1, 0.05, 3e-4),
        search_record("boom", 1.0, 0.1, 1e-2, model="pythia-160m", diverged=True),
        search_record("local", 0.3, 0.1, 1e-3, corpus="wikitext"),
    ]
    entry = registry(select_cells(records))
    assert (entry["version"], entry["experiment"], entry["kind"]) == (2, "tiny-search", "search")
    assert sorted(entry["cells"]) == ["pythia-70m/tinystories", "pythia-70m/wikitext"]
    cell = entry["cells"]["pythia-70m/tinystories"]
    assert "uri" not in json.dumps(entry)
    assert [cell[s]["fingerprint"] for s in ("sft", "reward", "ppo")] == ["s1", "r1", "p-best"]
    assert (cell["ppo"]["trial_id"], cell["ppo"]["objective"]) == ("best", 0.7)
    assert cell["ppo"]["params"] == {"ppo.init_kl_coef": 0.05, "ppo.learning_rate": 3e-4}
    assert cell["ppo"]["metrics"] == {"kl_last": 3.2, "reward_first": -4.2, "reward_last": -3.5,
                                      "delta_reward": pytest.approx(1.0), "win_rate": 0.607}
    assert cell["reward"]["metrics"] == {"heldout_accuracy": 0.98}
    assert cell["fingerprints"]["ppo"] == "p-best"


# -- plots and the whole report ---------------------------------------------------------------


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))  # a drawn figure, not an empty file


def test_plots_are_written_as_png(grid_rows, tmp_path):
    assert_png(plot_rewards(grid_rows, tmp_path / "rewards.png"))
    assert_png(plot_win_rates(grid_rows, tmp_path / "win_rates.png"))
    records = [search_record("a", 0.3, 0.05, 3e-4), search_record("b", None, 0.2, 1e-3),
               search_record("c", 0.9, 0.01, 1e-2, diverged=True),
               search_record("d", 0.1, 0.1, 1e-4, corpus="wikitext")]
    assert_png(plot_search_landscape(records, tmp_path / "landscape.png"))


def test_landscape_is_skipped_without_search_records(tmp_path):
    assert plot_search_landscape([make_record()], tmp_path / "landscape.png") is None
    assert not (tmp_path / "landscape.png").exists()


def test_write_report_for_a_grid(tmp_path):
    records = [make_record("pythia-70m", "tinystories", trial_id="g1"),
               make_record("pythia-70m", "wikitext", trial_id="g2", diverged=True)]
    summary = write_report(records, tmp_path / "report")
    names = sorted(path.name for path in summary["written"])
    assert names == ["registry.json", "results.csv", "results.json", "results.md", "rewards.png", "win_rates.png"]
    assert all(path.exists() for path in summary["written"])
    assert summary["cells_with_results"] == 1
    assert summary["cells_without_results"] == [
        {"model": "pythia-70m", "corpus": "wikitext", "trial_id": "g2", "reason": "PPO diverged"}
    ]
    saved = json.loads((tmp_path / "report" / "registry.json").read_text())
    assert list(saved["cells"]) == ["pythia-70m/tinystories"]


def test_write_report_for_a_search_adds_the_landscape(tmp_path):
    records = [search_record("a", 0.3, 0.05, 3e-4), search_record("b", 0.5, 0.2, 1e-3)]
    summary = write_report(records, tmp_path)
    landscape = tmp_path / "search_landscape.png"
    assert landscape in summary["written"]
    assert_png(landscape)
    assert summary["cells_with_results"] == 1 and summary["cells_without_results"] == []
    assert json.loads((tmp_path / "results.json").read_text())[0]["trial_id"] == "b"


def test_the_summary_counts_only_gains_that_are_confirmed():
    def row(ci_low=0.6, judge=0.3, judge_ci_low=0.55, judge_accuracy=0.9, rm_accuracy=0.95, flags=(), kl=5.0,
            delta=0.5):
        record = make_record(ppo_reward=-4.0 + delta, trial_id="t")
        evaluation = record["evaluation"]
        evaluation["paired_win_rate"] = {"win_rate": 0.8, "ci_low": ci_low, "ci_high": 0.95}
        evaluation["judge"] = {"delta": judge, "paired_win_rate": {"win_rate": 0.7, "ci_low": judge_ci_low,
                                                                   "ci_high": 0.8},
                               "heldout_accuracy": judge_accuracy}
        evaluation["hacking_flags"] = [f"{flag}: detail" for flag in flags]
        record["metrics"] = {"reward": {"heldout_accuracy": rm_accuracy}, "ppo": {"kl_last": kl}}
        return results_table([record])[0]

    good = row()
    assert good["confirmed"] and good["rm_accuracy"] == 0.95 and good["kl"] == 5.0
    failing = [row(ci_low=0.45), row(judge=-0.1), row(flags=("short",)), row(kl=float("nan")),
               row(kl=1e3), row(delta=-0.1), row(judge_ci_low=0.45), row(judge_accuracy=0.8),
               row(rm_accuracy=0.8)]
    assert [r["confirmed"] for r in failing] == [False] * 9
    assert failing[2]["hacking_flags"] == ["short"]
    summary = format_summary([good, *failing])
    assert "Confirmed gains: 1 of 10 cells (a held-out reward gain (delta > 0)" in summary
    line = next(text for text in summary.splitlines() if text.startswith("| pythia-70m") and "| short |" in text)
    assert "| no |" in line and "+0.300 (55.0%-80.0%)" in line


def test_a_collapsed_run_says_which_check_failed_and_why():
    record = make_record(trial_id="c1", diverged=True)
    record["error"] = "TrainingCheckError: 62% of the batch's responses are empty (limit 50%)"
    (row,) = results_table([record])
    assert row["state"] == "diverged"
    assert row["reason"] == "a training check failed: 62% of the batch's responses are empty (limit 50%)"
