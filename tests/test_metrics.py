"""Unit tests for slmrl_ray.metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from slmrl_ray import metrics as mt


def test_token_weighted_perplexity_differs_from_mean_of_perplexities() -> None:
    nll, tokens = [2.0, 30.0], [2, 10]
    # token-weighted: exp((2 + 30) / (2 + 10)) = exp(8/3) ~ 14.39
    # mean per-text:  (exp(2/2) + exp(30/10)) / 2 = (e + e^3) / 2 ~ 11.40
    ppl = mt.token_weighted_perplexity(nll, tokens)
    assert ppl == pytest.approx(math.exp(8 / 3))
    assert ppl != pytest.approx((math.e + math.exp(3)) / 2, rel=1e-3)
    with pytest.raises(ValueError):
        mt.token_weighted_perplexity([1.0], [0])


def test_reward_summary_population_std() -> None:
    s = mt.reward_summary([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; deviations^2 2.25+0.25+0.25+2.25 = 5 -> population var 5/4
    assert s == pytest.approx({"mean": 2.5, "std": math.sqrt(1.25), "min": 1.0, "max": 4.0, "n": 4})


def test_analytical_win_rate() -> None:
    assert mt.analytical_win_rate(1.0, 1.0, 1.0, 1.0) == pytest.approx(0.5)
    # delta = sqrt(2), scale = sqrt(1 + 1) -> Phi(1) = 0.841344746
    assert mt.analytical_win_rate(0.0, 1.0, math.sqrt(2), 1.0) == pytest.approx(0.841344746, abs=1e-9)
    assert mt.analytical_win_rate(1.0, 0.0, 2.0, 0.0) == 1.0
    assert mt.analytical_win_rate(1.0, 0.0, 1.0, 0.0) == 0.5
    assert mt.analytical_win_rate(2.0, 0.0, 1.0, 0.0) == 0.0


def test_paired_win_rate_ties_and_seeded_ci() -> None:
    ppo, sft = [3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 0.0]
    # outcomes: win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4 = 0.625
    r = mt.paired_win_rate(ppo, sft, num_bootstrap=500, seed=3)
    assert r["win_rate"] == pytest.approx(0.625)
    assert r["ci_low"] <= r["win_rate"] <= r["ci_high"]
    assert r["ci_low"] < r["ci_high"]
    assert mt.paired_win_rate(ppo, sft, num_bootstrap=500, seed=3) == r
    assert 0.0 <= r["ci_low"] and r["ci_high"] <= 1.0


def test_distinct_n_hand_example() -> None:
    responses = ["the cat the cat", "a dog"]
    # unigrams: the cat the cat a dog -> 6 total, unique {the, cat, a, dog} = 4
    assert mt.distinct_n(responses, 1) == pytest.approx(4 / 6)
    # bigrams: "the cat", "cat the", "the cat" | "a dog" -> 4 total, 3 unique = 0.75.
    # Crossing responses would add "cat a" -> 4/5 = 0.8, so 0.75 shows they do not cross.
    assert mt.distinct_n(responses, 2) == pytest.approx(3 / 4)


def test_distinct_n_lowercases_and_handles_empty() -> None:
    assert mt.distinct_n(["The CAT", "the cat"], 1) == pytest.approx(2 / 4)
    assert mt.distinct_n(["a", "b"], 2) == 0.0
    assert mt.distinct_n([], 1) == 0.0


def test_rouge_identical_is_one() -> None:
    texts = ["the cat sat on the mat", "a quick brown fox"]
    scores = mt.rouge_scores(texts, texts)
    assert scores == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


def test_rouge_partial_overlap() -> None:
    # unigram overlap: "the cat" of 3 pred / 3 ref tokens -> P = R = F1 = 2/3
    scores = mt.rouge_scores(["the cat sat"], ["the cat ran"])
    assert scores["rouge1"] == pytest.approx(2 / 3)


def test_bleu_identical_and_mismatch() -> None:
    ref = "the quick brown fox jumps over the lazy dog"
    same = mt.bleu_scores([ref], [ref])
    assert same["bleu"] == pytest.approx(100.0)
    assert same["precision_4gram"] == pytest.approx(100.0)
    # last word differs: precisions 8/9, 7/8, 6/7, 5/6 -> 4-gram precision 83.33,
    # BLEU = geometric mean of all four (brevity penalty 1) ~ 86.33.
    diff = mt.bleu_scores(["the quick brown fox jumps over the lazy cat"], [ref])
    assert diff["precision_4gram"] == pytest.approx(100 * 5 / 6)
    expected_bleu = 100 * (8 / 9 * 7 / 8 * 6 / 7 * 5 / 6) ** 0.25
    assert diff["bleu"] == pytest.approx(expected_bleu, rel=1e-6)
    assert diff["bleu"] != pytest.approx(diff["precision_4gram"])


def test_rouge_stems_inflected_words() -> None:
    """Porter stemming: "cats were running" matches "cat was run" on cat and run."""
    scores = mt.rouge_scores(["the cats were running"], ["the cat was run"])
    assert scores["rouge1"] == pytest.approx(3 / 4)  # the, cat, run; not were/was
    assert scores["rouge2"] == pytest.approx(1 / 3)  # "the cat"


def test_rouge_per_example_pairs_up_with_the_averaged_scores() -> None:
    predictions, references = ["the cat sat", "a dog ran far"], ["the cat ran", "the dog ran"]
    per_example = mt.rouge_f1_per_example(predictions, references, keys=("rougeL",))
    # LCS "the cat": P = R = 2/3; LCS "dog ran": P = 2/4, R = 2/3 -> F1 = 2PR / (P + R) = 4/7
    assert per_example["rougeL"] == pytest.approx([2 / 3, 4 / 7])
    assert mt.rouge_scores(predictions, references)["rougeL"] == pytest.approx((2 / 3 + 4 / 7) / 2)
    with pytest.raises(ValueError):
        mt.rouge_f1_per_example(["a"], [])
