"""The independent judge: another base model, another pair recipe, another seed, its own prompts."""

from __future__ import annotations

import dataclasses

import pytest

from slmrl_ray.artifacts import RunPaths, stage_fingerprints
from slmrl_ray.config import ConfigError, load_config
from slmrl_ray.data import (
    build_judge_pairs,
    build_preference_pairs,
    generate_documents,
    prompt_and_continuation,
    save_jsonl,
)
from slmrl_ray.stages.reward import training_pairs

CORPORA = ("tinystories", "cnn_dailymail", "wikitext")


def _config(tmp_path, model="pythia-70m", corpus="tinystories", *overrides):
    return load_config(preset="tiny", overrides=[f"model={model}", f"corpus={corpus}",
                                                  f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("corpus", CORPORA)
def test_judge_pairs_keep_the_real_continuation_and_reject_it_otherwise_than_the_study(corpus):
    docs = generate_documents(corpus, 300, seed=5)
    pairs = build_judge_pairs(corpus, docs, seed=3)
    assert len(pairs) >= 0.9 * len(docs)
    continuations: dict[str, set[str]] = {}  # openings repeat: a prompt may start several documents
    for doc in docs:
        prompt, continuation = prompt_and_continuation(corpus, doc)
        continuations.setdefault(prompt, set()).add(continuation)
    kinds = {pair.kind for pair in pairs}
    assert kinds == {"judge_other", "judge_reordered", "judge_cut"}
    for pair in pairs:
        assert pair.chosen in continuations[pair.prompt]  # a document's own continuation
        assert pair.rejected != pair.chosen
        if pair.kind == "judge_reordered":  # the same words, a wrong order: no length cue
            assert sorted(pair.rejected.replace(".", " ").split()) == sorted(pair.chosen.replace(".", " ").split())
        if pair.kind == "judge_cut":
            assert pair.chosen.startswith(pair.rejected) and len(pair.rejected) < len(pair.chosen)
    # Not the reward model's contrast: no judge pair is a study pair.
    study = {(p.prompt, p.rejected) for p in build_preference_pairs(corpus, docs, seed=3)}
    assert not study & {(p.prompt, p.rejected) for p in pairs}


def test_a_split_judge_trains_on_its_own_prompts_with_its_own_recipe(tmp_path):
    config = _config(tmp_path)
    assert config.judge.pairs == "both"  # the tiny preset's judge
    paths = RunPaths(tmp_path / "run")
    docs = generate_documents("tinystories", 400, seed=1)
    save_jsonl(paths.data / "train.jsonl", docs)
    save_jsonl(paths.data / "pairs_train.jsonl", build_preference_pairs("tinystories", docs, seed=1))
    pairs = training_pairs(config, paths)
    model_prompts = {p.prompt for p in pairs["model"]}
    judge_prompts = {p.prompt for p in pairs["judge"]}
    assert model_prompts and judge_prompts and not model_prompts & judge_prompts
    assert {p.kind for p in pairs["model"]} == {"study"}
    other_kinds = {"judge_other", "judge_reordered", "judge_cut"}
    assert {p.kind for p in pairs["judge"]} >= {"study", *other_kinds, "empty"}
    by_recipe = {recipe: training_pairs(_config(tmp_path, "pythia-70m", "tinystories", f"judge.pairs={recipe}"), paths)
                 for recipe in ("study", "other")}
    for recipe, split in by_recipe.items():
        assert split["model"] == pairs["model"]  # the reward model's pairs never change
        assert {p.prompt for p in split["judge"]} == judge_prompts  # nor the judge's prompts
    assert {p.kind for p in by_recipe["study"]["judge"]} == {"study"}
    assert {p.kind for p in by_recipe["other"]["judge"]} == {*other_kinds, "empty", "fragment", "padded"}
    assert sorted(map(repr, pairs["judge"])) == sorted(map(repr, by_recipe["study"]["judge"] + by_recipe["other"]["judge"]))


@pytest.mark.parametrize(("model", "judge_base"), [("pythia-70m", "smollm2-135m"), ("pythia-410m", "smollm2-135m"),
                                                   ("smollm2-135m", "pythia-70m"), ("smollm2-360m", "pythia-70m")])
def test_other_family_picks_the_first_model_of_the_other_architecture(tmp_path, model, judge_base):
    config = _config(tmp_path, model)
    assert config.judge_base_key() == judge_base
    assert config.models[judge_base].family != config.model_config.family
    assert _config(tmp_path, model, "tinystories", "judge.base_model=sft").judge_base_key() is None
    assert _config(tmp_path, model, "tinystories", "judge.base_model=pythia-160m").judge_base_key() == "pythia-160m"


def test_an_unknown_or_missing_judge_base_is_a_config_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="judge.base_model: 'gpt2'"):
        _config(tmp_path, "pythia-70m", "tinystories", "judge.base_model=gpt2")
    config = _config(tmp_path)
    only_neox = {key: model for key, model in config.models.items() if model.family == "gpt_neox"}
    with pytest.raises(ConfigError, match="other_family, but every model in `models:` is gpt_neox"):
        dataclasses.replace(config, models=only_neox)


def test_the_judge_base_and_recipe_are_in_the_reward_stages_fingerprint(tmp_path):
    base = stage_fingerprints(_config(tmp_path))
    for override in ("judge.base_model=sft", "judge.pairs=study", "judge.pairs=other", "judge.base_model=smollm2-360m",
                     "models.smollm2-135m.lora_r=8"):
        changed = stage_fingerprints(_config(tmp_path, "pythia-70m", "tinystories", override))
        assert changed["sft"] == base["sft"] and changed["reward"] != base["reward"], override
    # Another cell's model that is not this cell's judge base changes nothing here.
    unrelated = stage_fingerprints(_config(tmp_path, "pythia-70m", "tinystories", "models.smollm2-360m.lora_r=8"))
    assert unrelated == base
