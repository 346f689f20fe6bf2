"""Reward sources: verifiable rules, weighted mixes, the judge, hacking flags and the RM-initialised critic."""

from __future__ import annotations

import json

import pytest
import torch

from slmrl_ray.config import ConfigError, RuleConfig, load_config
from slmrl_ray.data import PreferencePair, load_jsonl
from slmrl_ray.rewards import MixedReward, RuleSet, rule_score
from slmrl_ray.stages.evaluate import hacking_flags

HERO = RuleConfig(kind="regex", prompt_pattern=r"named (?P<name>[A-Z][a-z]+)", pattern=r"\b{name}\b")


# ------------------------------------------------------------------ rules, by hand


def test_regex_rule_fills_its_pattern_from_the_prompt():
    prompt = "Once upon a time, there was a brave pig named Zoe."
    assert rule_score(HERO, prompt, "Zoe had a big book.") == 1.0
    assert rule_score(HERO, prompt, "Zoey had a big book.") == 0.0  # word boundary
    assert rule_score(HERO, prompt, "Max had a big book.") == 0.0
    assert rule_score(HERO, "A pig with no name.", "Zoe had a book.") == 0.0  # prompt does not match
    # The captured text is literal: a name with regex characters cannot inject a pattern.
    assert rule_score(HERO, "named A.b", "Axb") == 0.0


def test_exact_match_extracts_the_answer_and_compares_with_the_prompts_fields():
    rule = RuleConfig(kind="exact_match", prompt_pattern=r"(?P<a>\d+) \+ (?P<b>\d+)",
                      pattern=r"answer: (\d+)", answer="{a}{b}")
    assert rule_score(rule, "What is 1 + 2?", "I think... answer: 12") == 1.0
    assert rule_score(rule, "What is 1 + 2?", "answer: 3") == 0.0
    assert rule_score(rule, "What is 1 + 2?", "12") == 0.0  # no "answer:" to extract
    whole = RuleConfig(kind="exact_match", answer="yes")
    assert rule_score(whole, "Is it?", "  yes \n") == 1.0
    assert rule_score(whole, "Is it?", "yes!") == 0.0


def test_format_rule_needs_the_whole_response_and_quantifiers_are_not_fields():
    rule = RuleConfig(kind="format", pattern=r"[A-Z][a-z]{2,4}\.")
    assert rule_score(rule, "p", "Zoe.") == 1.0
    assert rule_score(rule, "p", "Zoe. More") == 0.0
    assert rule_score(rule, "p", "Ab.") == 0.0


def test_length_rule_is_one_at_the_target_and_falls_linearly():
    rule = RuleConfig(kind="length", target=10, tolerance=0.5)  # 0 at 5 and 15 words
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    assert rule_score(rule, "p", words(10)) == 1.0
    assert rule_score(rule, "p", words(12)) == pytest.approx(0.6)
    assert rule_score(rule, "p", words(7)) == pytest.approx(0.4)
    assert rule_score(rule, "p", words(16)) == 0.0
    assert rule_score(rule, "p", "") == 0.0


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"kind": "regex"}, "a regex rule needs a `pattern`"),
        ({"kind": "exact_match"}, "needs an `answer`"),
        ({"kind": "length", "target": 0}, "positive `target`"),
        ({"kind": "regex", "pattern": "(unclosed"}, "pattern: not a valid regular expression"),
        ({"kind": "regexp", "pattern": "x"}, "rewards.rules[0].kind: 'regexp' is not one of"),
    ],
)
def test_bad_rules_are_errors_naming_the_rule(rule, message):
    with pytest.raises(ConfigError, match="rewards.rules") as error:
        load_config(preset="tiny", overrides=[f"rewards.rules=[{json.dumps(rule)}]"])
    assert message in str(error.value)


def test_a_reward_with_nothing_to_score_is_an_error():
    with pytest.raises(ConfigError, match="rewards: model_weight is 0 and there are no rules"):
        load_config(preset="tiny", overrides=["rewards.model_weight=0"])


class _ConstantModel:
    def score(self, prompts, responses):
        return torch.full((len(prompts),), 2.0)


def test_mixed_reward_is_the_weighted_sum_of_its_components():
    rules = [RuleConfig(kind="regex", pattern="good", weight=0.5, name="good"),
             RuleConfig(kind="length", target=2, tolerance=0.5, weight=2.0)]
    mixed = MixedReward(_ConstantModel(), 0.25, RuleSet(rules))
    parts = mixed.components(["p", "p"], ["good day", "bad"])
    assert set(parts) == {"model", "good", "length_1"}
    assert mixed.score(["p", "p"], ["good day", "bad"]).tolist() == pytest.approx(
        [0.25 * 2 + 0.5 * 1 + 2.0 * 1, 0.25 * 2 + 0 + 2.0 * 0])
    rules_only = MixedReward(None, 0.0, RuleSet(rules))
    assert rules_only.score(["p"], ["good day"]).tolist() == pytest.approx([2.5])


# ------------------------------------------------------------------ hacking flags


def _policy(length: float, distinct_2: float) -> dict:
    return {"response_chars_mean": length, "distinct_2": distinct_2}


def test_hacking_flags_fire_on_length_diversity_and_judge_disagreement():
    cfg = load_config(preset="tiny").eval
    calm = hacking_flags(_policy(100, 0.8), _policy(120, 0.7), {"delta_reward": 0.5}, cfg)
    assert calm == []
    flags = hacking_flags(_policy(100, 0.8), _policy(200, 0.3),
                          {"delta_reward": 0.5, "judge": {"delta": -0.2}}, cfg)
    assert [f.split(":")[0] for f in flags] == ["length", "distinct-2", "judge"]
    assert "2.00x" in flags[0]


def test_hacking_flags_fire_on_collapsed_answers_and_an_unconfirmed_gain():
    """What the tiny grid's wikitext cells did: reward up, answers shrunk to fragments."""
    cfg = load_config(preset="tiny").eval
    flags = hacking_flags(_policy(120, 0.8), _policy(30, 0.8), {"delta_reward": 1.5, "judge": {"delta": 0.0}}, cfg)
    assert [f.split(":")[0] for f in flags] == ["short", "judge"]
    assert "0.25x" in flags[0]
    assert hacking_flags(_policy(120, 0.8), _policy(70, 0.8), {"delta_reward": 1.5, "judge": {"delta": 0.3}}, cfg) == []
    assert hacking_flags(_policy(120, 0.8), _policy(120, 0.8), {"delta_reward": -0.2, "judge": {"delta": -0.3}}, cfg) == []


# ------------------------------------------------------------------ end to end on the tiny run


@pytest.mark.slow
def test_verifiable_reward_rises_under_ppo(run_copy):
    """The shipped tiny_verifiable task: rules only, no reward model; the rules' score goes up."""
    from slmrl_ray.pipeline import run_pipeline

    base, paths = run_copy
    config = load_config(preset="tiny_verifiable", overrides=[f"output_dir={base.output_dir}"])
    run_pipeline(config, stages=["ppo", "eval"], log=lambda _: None)
    log = [json.loads(line) for line in (paths.ppo / "log.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in log if "reward_mean" in r]
    quarter = len(rewards) // 4
    first, last = sum(rewards[:quarter]) / quarter, sum(rewards[-quarter:]) / quarter
    assert last > first + 0.2, (first, last)
    assert "reward/model" not in log[0]  # no reward model was loaded
    assert {"reward/names_the_hero", "reward/ends_a_sentence", "reward/about_12_words"} <= set(log[0])
    evaluation = json.loads((paths.eval / "evaluation_results.json").read_text())
    components = evaluation["ppo"]["reward_components"]
    assert set(components) == {"names_the_hero", "ends_a_sentence", "about_12_words"}
    total = 1.0 * components["names_the_hero"] + 0.5 * components["ends_a_sentence"] + 0.5 * components["about_12_words"]
    assert evaluation["ppo"]["reward"]["mean"] == pytest.approx(total, abs=1e-5)
    assert evaluation["delta_reward"] > 0


@pytest.mark.slow
def test_split_judge_is_trained_on_disjoint_pairs_and_scores_evaluation(run_copy):
    from slmrl_ray.pipeline import run_pipeline
    from slmrl_ray.stages.reward import training_pairs

    base, paths = run_copy
    config = load_config(preset="tiny", overrides=[
        f"output_dir={base.output_dir}", "judge.source=split", "judge.pairs=study", "ppo.steps=6",
        "eval.num_prompts=16"])  # the study's pairs split in two (other recipes: tests/test_judge.py)
    parts = training_pairs(config, paths)
    model_prompts = {p.prompt for p in parts["model"]}
    judge_prompts = {p.prompt for p in parts["judge"]}
    assert model_prompts and judge_prompts and not model_prompts & judge_prompts
    all_pairs = load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair)
    assert len(parts["model"]) + len(parts["judge"]) == len(all_pairs)

    results = run_pipeline(config, stages=["reward", "ppo", "eval"], log=lambda _: None)
    reward = results["reward"]
    assert reward["train_pairs"] == len(parts["model"]) and reward["judge_train_pairs"] == len(parts["judge"])
    assert reward["heldout_accuracy"] > 0.8 and reward["judge_heldout_accuracy"] > 0.8
    assert (paths.reward / "judge" / "model.safetensors").exists()
    evaluation = results["eval"]
    judge = evaluation["judge"]
    assert judge["delta"] == pytest.approx(
        evaluation["ppo"]["judge_reward"]["mean"] - evaluation["sft"]["judge_reward"]["mean"])
    assert judge["gap"] == pytest.approx(judge["reward_standardized_delta"] - judge["standardized_delta"])
    # Evaluation measures the judge on the held-out pairs through the scorer the reward stage used.
    assert judge["heldout_accuracy"] == pytest.approx(reward["judge_heldout_accuracy"])
    assert judge["heldout_pairs"] == reward["judge_heldout_pairs"] > 0
    assert {"win_rate", "ci_low", "ci_high"} <= set(judge["paired_win_rate"])
    gold = evaluation["gold"]  # per-prompt ROUGE-L against the references: its mean is the policy's ROUGE-L
    assert gold["sft"] == pytest.approx(evaluation["sft"]["rougeL"]) and gold["ppo"] == pytest.approx(
        evaluation["ppo"]["rougeL"])
    assert isinstance(evaluation["hacking_flags"], list)
    samples = [json.loads(line) for line in (paths.eval / "samples_ppo.jsonl").read_text().splitlines()]
    assert all("judge" in s for s in samples)
    # The judge is a different model from the training reward: its scores differ.
    assert any(abs(s["judge"] - s["reward"]) > 1e-3 for s in samples)


@pytest.mark.slow
def test_critic_from_the_reward_model_starts_at_its_score_and_trains(run_copy):
    from slmrl_ray.pipeline import run_pipeline
    from slmrl_ray.scoring import encode_reward_text
    from slmrl_ray.stages.ppo import build_components

    base, paths = run_copy
    config = load_config(preset="tiny", overrides=[
        f"output_dir={base.output_dir}", "ppo.value_init=reward_model", "ppo.steps=4", "eval.num_prompts=8"])
    parts = build_components(config, paths)
    assert parts.model.value_head is None and parts.model.critic is not None
    pair = load_jsonl(paths.data / "pairs_heldout.jsonl", PreferencePair)[0]
    ids = torch.tensor([encode_reward_text(parts.tokenizer, pair.prompt, pair.chosen, config.reward.max_length)])
    split = ids.shape[1] // 2
    query, response = ids[:, :split], ids[:, split:]
    outputs = parts.model.response_outputs(query, torch.ones_like(query), response, torch.ones_like(response),
                                           temperature=1.0)
    # The value of the last step is read before its token (EOS): the RM's score of all but it.
    with torch.no_grad():
        rm_score = parts.scorer.model.model(input_ids=ids[:, :-1]).logits[0, 0]
        other = parts.scorer.model.model(input_ids=ids).logits[0, 0]
    assert float(outputs.values[0, -1]) == pytest.approx(float(rm_score), abs=1e-4)
    assert abs(float(other) - float(rm_score)) > 1e-3  # so the check above is not vacuous
    trainable = [n for n, p in parts.model.named_parameters() if p.requires_grad]
    assert any(n.startswith("critic.score") for n in trainable)
    assert any(n.startswith("critic.backbone") and "lora_" in n for n in trainable)

    results = run_pipeline(config, stages=["ppo"], log=lambda _: None)
    assert results["ppo"]["steps"] == 4
    assert (paths.ppo / "critic.safetensors").exists() and not (paths.ppo / "value_head.safetensors").exists()
