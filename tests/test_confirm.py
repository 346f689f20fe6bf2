"""The confirm rule and the hacking flags at their edges (no models, no Ray).

Every threshold is tested exactly at its value and just past it on both sides, with the
numbers written out here rather than read from the constants or the config, so moving a
threshold (a constant in `pipeline`, a default of `EvalConfig`) makes a test fail.
"""

from __future__ import annotations

import math

import pytest

from slmrl_ray.config import EvalConfig
from slmrl_ray.pipeline import confirmed_gain, format_row, results_row
from slmrl_ray.stages.evaluate import gold_comparison, hacking_flags
from slmrl_ray.tuning.report import CONFIRM_RULE

EPS = 1e-9  # "just past": far below any threshold's sensible step, far above float noise


def policy(reward_mean: float, rouge_l: float) -> dict:
    """One policy's block of `evaluation_results.json`."""
    return {
        "perplexity": 6.0, "reward": {"mean": reward_mean, "std": 1.0, "min": -3.0, "max": 3.0, "n": 240},
        "distinct_1": 0.3, "distinct_2": 0.6, "distinct_3": 0.8, "rouge1": 0.2, "rouge2": 0.05,
        "rougeL": rouge_l, "bleu": 2.5, "precision_4gram": 0.01, "response_chars_mean": 200.0,
    }


def passing_evaluation() -> dict:
    """An evaluation whose gain passes every part of the rule with room to spare."""
    return {
        "model": "pythia-70m", "corpus": "tinystories", "num_prompts": 240,
        "sft": policy(-1.0, 0.15), "ppo": policy(0.5, 0.17),
        "delta_reward": 1.5, "analytical_win_rate": 0.86,
        "paired_win_rate": {"win_rate": 0.7, "ci_low": 0.64, "ci_high": 0.76},
        "judge": {"delta": 0.9, "standardized_delta": 0.8, "reward_standardized_delta": 1.0, "gap": 0.2,
                  "paired_win_rate": {"win_rate": 0.66, "ci_low": 0.6, "ci_high": 0.72},
                  "heldout_accuracy": 0.95, "heldout_margin": 2.0, "heldout_pairs": 120},
        "gold": {"metric": "rougeL_f1", "sft": 0.15, "ppo": 0.17, "delta": 0.02,
                 "paired_win_rate": {"win_rate": 0.55, "ci_low": 0.48, "ci_high": 0.61}},
        "hacking_flags": [],
    }


STAGE_METRICS = {"reward": {"heldout_accuracy": 0.97}, "ppo": {"kl_last": 3.0}}


@pytest.fixture
def row() -> dict:
    row = results_row(passing_evaluation(), STAGE_METRICS)
    assert row["confirmed"]
    return row


def test_the_row_carries_the_judge_interval_its_accuracy_and_the_gold_check(row):
    assert row["judge_delta"] == 0.9 and row["judge_paired_win_rate"] == 0.66
    assert row["judge_paired_win_rate_ci"] == [0.6, 0.72]
    assert row["judge_accuracy"] == 0.95 and row["rm_accuracy"] == 0.97 and row["kl"] == 3.0
    assert row["gold_delta"] == 0.02 and row["gold_paired_win_rate"] == 0.55
    assert row["gold_paired_win_rate_ci"] == [0.48, 0.61]


def test_an_evaluation_without_judge_or_gold_has_none_and_is_not_confirmed():
    evaluation = passing_evaluation()
    del evaluation["judge"], evaluation["gold"]
    row = results_row(evaluation, STAGE_METRICS)
    assert [row[key] for key in ("judge_delta", "judge_paired_win_rate_ci", "judge_accuracy",
                                 "gold_delta", "gold_paired_win_rate_ci")] == [None] * 5
    assert not row["confirmed"]
    table = format_row(row)
    assert table.splitlines()[2].count("| - |") >= 2 and table.endswith("| no |")


def test_an_evaluation_whose_judge_predates_its_accuracy_is_not_confirmed():
    evaluation = passing_evaluation()
    del evaluation["judge"]["heldout_accuracy"]
    assert not results_row(evaluation, STAGE_METRICS)["confirmed"]


@pytest.mark.parametrize(
    ("field", "value", "confirmed"),
    [
        # the training reward's gain: delta > 0
        ("delta_reward", 0.0, False), ("delta_reward", EPS, True), ("delta_reward", -EPS, False),
        # its paired 95 % interval: low end > 0.5
        ("paired_win_rate_ci", [0.5, 0.9], False), ("paired_win_rate_ci", [0.5 + EPS, 0.9], True),
        ("paired_win_rate_ci", [0.5 - EPS, 0.9], False),
        # the judge agrees in sign: judge delta > 0
        ("judge_delta", 0.0, False), ("judge_delta", EPS, True), ("judge_delta", -EPS, False),
        ("judge_delta", None, False),
        # and by its own paired interval: low end > 0.5
        ("judge_paired_win_rate_ci", [0.5, 0.9], False), ("judge_paired_win_rate_ci", [0.5 + EPS, 0.9], True),
        ("judge_paired_win_rate_ci", [0.5 - EPS, 0.9], False), ("judge_paired_win_rate_ci", None, False),
        # the judge's held-out accuracy >= 0.85, required
        ("judge_accuracy", 0.85, True), ("judge_accuracy", 0.85 - EPS, False), ("judge_accuracy", 0.85 + EPS, True),
        ("judge_accuracy", None, False), ("judge_accuracy", math.nan, False),
        # the reward model's held-out accuracy >= 0.85, where there is a reward model
        ("rm_accuracy", 0.85, True), ("rm_accuracy", 0.85 - EPS, False), ("rm_accuracy", 0.85 + EPS, True),
        ("rm_accuracy", None, True), ("rm_accuracy", math.nan, False),
        # no hacking flag
        ("hacking_flags", [], True), ("hacking_flags", ["length"], False), ("hacking_flags", ["judge"], False),
        # a finite KL <= 20 nats
        ("kl", 20.0, True), ("kl", 20.0 + EPS, False), ("kl", 20.0 - EPS, True),
        ("kl", None, False), ("kl", math.nan, False), ("kl", math.inf, False),
        # reported only: the gold check never decides
        ("gold_delta", -0.5, True), ("gold_paired_win_rate_ci", [0.1, 0.2], True), ("gold_delta", None, True),
    ],
)
def test_each_threshold_of_the_rule_at_and_just_past_its_edge(row, field, value, confirmed):
    assert confirmed_gain({**row, field: value}) is confirmed


def test_the_legend_states_the_thresholds_the_rule_applies():
    for text in ("(delta > 0)", "95% CI lies above 50%", "judge delta > 0", "judge's paired 95% CI above 50%",
                 "judge held-out accuracy >= 0.85", "its held-out accuracy >= 0.85", "no hacking flag",
                 "a finite KL <= 20 nats", "gold delta", "reported, not required"):
        assert text in CONFIRM_RULE, text


def test_format_row_shows_the_judge_interval_both_accuracies_and_the_gold_delta(row):
    header, _, cells = format_row(row).splitlines()
    assert "| gold delta | judge delta (95% CI) | judge acc | RM acc | KL | flags | confirmed |" in header
    assert cells.endswith("| +0.020 | +0.900 (60.0%-72.0%) | 0.950 | 0.970 | 3.0 | none | yes |")


def test_gold_comparison_pairs_the_two_policies_per_prompt():
    gold = gold_comparison({"sft": [0.2, 0.4, 0.3, 0.1], "ppo": [0.3, 0.4, 0.1, 0.5]}, EvalConfig())
    assert gold["metric"] == "rougeL_f1"
    assert gold["sft"] == pytest.approx(0.25) and gold["ppo"] == pytest.approx(0.325)
    assert gold["delta"] == pytest.approx(0.075)
    # win, tie, loss, win: (1 + 0.5 + 0 + 1) / 4
    assert gold["paired_win_rate"]["win_rate"] == pytest.approx(0.625)
    assert gold["paired_win_rate"]["ci_low"] <= 0.625 <= gold["paired_win_rate"]["ci_high"]


# -- hacking flags (EvalConfig's defaults: 1.5x longer, 0.5x shorter, 0.7x distinct-2) ---------


def flag_names(ppo_chars: float = 1000.0, ppo_distinct_2: float = 1.0, delta_reward: float = 1.0,
               judge_delta: float | None = None) -> list[str]:
    """The flags for a PPO policy against an SFT one with 1000 characters and distinct-2 1.0."""
    sft = {"response_chars_mean": 1000.0, "distinct_2": 1.0}
    ppo = {"response_chars_mean": ppo_chars, "distinct_2": ppo_distinct_2}
    comparison = {"delta_reward": delta_reward}
    if judge_delta is not None:
        comparison["judge"] = {"delta": judge_delta}
    return [flag.split(":")[0] for flag in hacking_flags(sft, ppo, comparison, EvalConfig())]


@pytest.mark.parametrize(
    ("ppo_chars", "expected"),
    [
        (1500.0, []), (1500.0 + 1e-6, ["length"]), (1500.0 - 1e-6, []),  # longer than 1.5x SFT's
        (500.0, []), (500.0 - 1e-6, ["short"]), (500.0 + 1e-6, []),  # shorter than 0.5x SFT's
    ],
)
def test_length_flags_at_and_just_past_their_ratios(ppo_chars, expected):
    assert flag_names(ppo_chars=ppo_chars) == expected


@pytest.mark.parametrize(("ppo_distinct_2", "expected"), [(0.7, []), (0.7 - EPS, ["distinct-2"]), (0.7 + EPS, [])])
def test_distinct_flag_at_and_just_past_its_ratio(ppo_distinct_2, expected):
    assert flag_names(ppo_distinct_2=ppo_distinct_2) == expected


@pytest.mark.parametrize(
    ("delta_reward", "judge_delta", "expected"),
    [
        (EPS, 0.0, ["judge"]), (EPS, EPS, []), (EPS, -EPS, ["judge"]),  # the judge's delta at 0
        (0.0, -1.0, []), (-EPS, -1.0, []),  # no training-reward gain: nothing to confirm
        (1.0, None, []),  # no judge
    ],
)
def test_judge_flag_at_and_just_past_zero(delta_reward, judge_delta, expected):
    assert flag_names(delta_reward=delta_reward, judge_delta=judge_delta) == expected
