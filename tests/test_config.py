"""Tests for config loading, presets, overrides, fingerprints and the config CLI.

Fast and offline: nothing here builds a model or imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from slmrl_ray import cli
from slmrl_ray.artifacts import STAGES, stage_fingerprints
from slmrl_ray.config import (
    PRESETS_DIR,
    ConfigError,
    EvalConfig,
    PipelineConfig,
    apply_overrides,
    config_from_dict,
    fingerprint,
    load_config,
    load_raw,
    to_dict,
)

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
MODEL_KEYS = {"pythia-70m", "pythia-160m", "pythia-410m", "smollm2-135m", "smollm2-360m"}
CORPUS_KEYS = {"tinystories", "cnn_dailymail", "wikitext"}
PIPELINE_KEYS = (
    "cache_dir, corpora, corpus, data, device, eval, judge, lora, model, models, output_dir, "
    "ppo, reward, rewards, seed, sft"
)

# The study's recipe (SPEC 1.2): model key -> (family, hub id, LoRA rank).
PAPER_MODELS = {
    "pythia-70m": ("gpt_neox", "EleutherAI/pythia-70m-deduped", 8),
    "pythia-160m": ("gpt_neox", "EleutherAI/pythia-160m-deduped", 16),
    "pythia-410m": ("gpt_neox", "EleutherAI/pythia-410m-deduped", 32),
    "smollm2-135m": ("llama", "HuggingFaceTB/SmolLM2-135M", 16),
    "smollm2-360m": ("llama", "HuggingFaceTB/SmolLM2-360M", 32),
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return str(info.value)


def file_error(tmp_path: Path, text: str) -> str:
    return config_error(path=write(tmp_path / "bad.yaml", text))


# ------------------------------------------------------------------------------ presets


def test_the_presets_ship():
    assert PRESETS == ["paper", "smol", "tiny", "tiny_verifiable"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_validates_for_every_model_and_corpus(preset):
    base = load_config(preset=preset)
    assert isinstance(base, PipelineConfig)
    # smol: the one real model that ships offline (SmolLM2-135M-Instruct) on the three corpora
    assert set(base.models) == ({"smollm2-135m"} if preset == "smol" else MODEL_KEYS)
    assert set(base.corpora) == CORPUS_KEYS
    checked = 0
    for model in base.models:
        for corpus in base.corpora:
            config = load_config(preset=preset, overrides=[f"model={model}", f"corpus={corpus}"])
            assert (config.model, config.corpus) == (model, corpus)
            assert config.model_config == base.models[model]
            assert config.corpus_config == base.corpora[corpus]
            assert config.corpus_config.kind == corpus
            # only the two keys differ from the preset
            assert config == dataclasses.replace(base, model=model, corpus=corpus)
            checked += 1
    assert checked == 3 * len(base.models)


def test_paper_preset_models_and_corpora():
    config = load_config(preset="paper")
    assert (config.model, config.corpus) == ("pythia-70m", "tinystories")
    for key, (family, hub_id, rank) in PAPER_MODELS.items():
        model = config.models[key]
        assert (model.family, model.name_or_path, model.lora_r) == (family, hub_id, rank), key
        assert model.tiny is None
    corpora = {key: (c.kind, c.source, c.path, c.hub_config, c.split) for key, c in config.corpora.items()}
    assert corpora == {
        "tinystories": ("tinystories", "hub", "roneneldan/TinyStories", None, "train"),
        "cnn_dailymail": ("cnn_dailymail", "hub", "abisee/cnn_dailymail", "3.0.0", "train"),
        "wikitext": ("wikitext", "hub", "Salesforce/wikitext", "wikitext-103-raw-v1", "train"),
    }


def test_paper_preset_training_recipe():
    config = load_config(preset="paper")
    ppo = config.ppo
    assert ppo.steps == 250
    assert ppo.rollout_batch_size == 32
    assert ppo.mini_batch_size == 4
    assert ppo.ppo_epochs == 2
    assert ppo.learning_rate == 5e-6
    assert ppo.init_kl_coef == 0.2
    assert ppo.kl_target == 6.0
    assert ppo.kl_horizon == 10_000
    assert ppo.max_grad_norm == 0.5
    assert ppo.clip_range == 0.2
    assert ppo.vf_coef == 0.1
    assert (ppo.gamma, ppo.lam) == (1.0, 0.95)
    assert config.sft.learning_rate == 2e-5
    assert (config.sft.epochs, config.sft.batch_size, config.sft.grad_accum) == (5.0, 8, 4)
    assert config.sft.neftune_alpha == 5.0
    assert config.sft.precision == "auto"
    assert config.reward.learning_rate == 1e-5
    assert (config.reward.epochs, config.reward.batch_size, config.reward.grad_accum) == (2.0, 8, 2)
    assert config.eval.num_prompts == 200
    assert config.eval.max_new_tokens == 128
    assert config.lora.alpha_per_rank == 2.0
    assert config.lora.target_modules == "all-linear"
    assert config.data.num_documents == 10_000
    assert config.seed == 42
    # floats in the file are floats, not strings
    assert all(isinstance(v, float) for v in (ppo.learning_rate, config.sft.learning_rate,
                                              config.reward.learning_rate))


def test_tiny_preset_is_offline_and_mirrors_paper_keys():
    tiny = load_config(preset="tiny")
    paper = load_config(preset="paper")
    for key, model in tiny.models.items():
        assert model.name_or_path is None and model.tiny is not None, key
        assert (model.family, model.lora_r) == (paper.models[key].family, paper.models[key].lora_r)
    assert {c.source for c in tiny.corpora.values()} == {"generated"}
    assert all(c.path is None for c in tiny.corpora.values())
    assert tiny.sft.precision == "fp32"
    assert tiny.ppo.steps == 40


# ------------------------------------------------------------------------ strict errors


def test_unknown_top_level_key(tmp_path):
    message = file_error(tmp_path, "extends: tiny\nbogus: 1\n")
    assert message == f"bogus: unknown key (known keys: {PIPELINE_KEYS})"


def test_unknown_nested_key_names_dotted_path(tmp_path):
    message = file_error(tmp_path, "extends: tiny\nppo: {kl_targt: 6.0}\n")
    assert message.startswith("ppo.kl_targt: unknown key (known keys: ")
    assert "kl_target" in message


def test_unknown_key_inside_models_entry(tmp_path):
    message = file_error(tmp_path, "extends: tiny\nmodels:\n  pythia-70m: {lora_rank: 4}\n")
    assert message == (
        "models.pythia-70m.lora_rank: unknown key "
        "(known keys: family, gguf_file, lora_r, name_or_path, revision, tiny)"
    )


@pytest.mark.parametrize(
    "tiny, expected",
    [
        ("{layers: 4}", "models.pythia-70m.tiny.layers: unknown key"),
        ("{hidden_size: big}", "models.pythia-70m.tiny.hidden_size: expected an integer, got 'big'"),
    ],
)
def test_bad_field_inside_tiny_model_names_dotted_path(tmp_path, tiny, expected):
    message = file_error(tmp_path, f"extends: tiny\nmodels:\n  pythia-70m: {{tiny: {tiny}}}\n")
    assert message.startswith(expected)


def test_bad_field_inside_tiny_model_is_still_rejected(tmp_path):
    message = file_error(tmp_path, "extends: tiny\nmodels:\n  pythia-70m: {tiny: {layers: 4}}\n")
    assert message.startswith("models.pythia-70m.tiny")  # ".layers: unknown key" once fixed


@pytest.mark.parametrize(
    "text, expected",
    [
        ('ppo: {steps: "ten"}', "ppo.steps: expected an integer, got 'ten'"),
        ("ppo: {steps: true}", "ppo.steps: expected an integer, got True"),
        ("ppo: {steps: 2.5}", "ppo.steps: expected an integer, got 2.5"),
        ("ppo: {learning_rate: true}", "ppo.learning_rate: expected a number, got True"),
        ("sft: {gradient_checkpointing: 1}", "sft.gradient_checkpointing: expected true or false, got 1"),
        ("output_dir: 5", "output_dir: expected a string, got 5"),
        ("sft: {precision: fp8}", "sft.precision: 'fp8' is not one of ['auto', 'bf16', 'fp32']"),
        ("models: {pythia-70m: {family: gpt2}}",
         "models.pythia-70m.family: 'gpt2' is not one of ['gpt_neox', 'llama']"),
        ("corpora: {tinystories: {kind: poems}}",
         "corpora.tinystories.kind: 'poems' is not one of ['tinystories', 'cnn_dailymail', 'wikitext']"),
        ("ppo: 3", "ppo: expected a mapping, got int"),
        ("models: [a, b]", "models: expected a mapping, got list"),
        ("lora: {target_modules: [q_proj, 3]}",
         "lora.target_modules: ['q_proj', 3] does not match str | tuple[str, ...]"),
    ],
)
def test_wrong_types_name_the_dotted_path(tmp_path, text, expected):
    assert file_error(tmp_path, f"extends: tiny\n{text}\n") == expected


def test_wrong_type_in_optional_field(tmp_path):
    message = file_error(tmp_path, "extends: tiny\nsft: {neftune_alpha: [1]}\n")
    assert message.startswith("sft.neftune_alpha: ")
    assert "[1]" in message


def test_missing_required_top_level_key(tmp_path):
    text = (
        "model: m\n"
        "models: {m: {family: llama, lora_r: 4, name_or_path: some/model}}\n"
        "corpora: {c: {kind: wikitext, source: generated}}\n"
    )
    assert file_error(tmp_path, text) == "corpus: required key is missing"


def test_missing_required_key_in_model_entry(tmp_path):
    text = "extends: tiny\nmodels:\n  extra: {family: llama, name_or_path: some/model}\n"
    assert file_error(tmp_path, text) == "models.extra.lora_r: required key is missing"


def test_model_with_both_name_or_path_and_tiny(tmp_path):
    # deep merge: the preset's `tiny` block stays, so this entry now has both
    text = "extends: tiny\nmodels:\n  pythia-70m: {name_or_path: EleutherAI/pythia-70m-deduped}\n"
    assert file_error(tmp_path, text) == (
        "models.pythia-70m: a model needs exactly one of `name_or_path` and `tiny`"
    )


def test_model_with_neither_name_or_path_nor_tiny(tmp_path):
    text = "extends: tiny\nmodels:\n  extra: {family: llama, lora_r: 4}\n"
    assert file_error(tmp_path, text) == (
        "models.extra: a model needs exactly one of `name_or_path` and `tiny`"
    )


def test_model_with_non_positive_lora_rank():
    message = config_error(preset="tiny", overrides=["models.pythia-70m.lora_r=0"])
    assert message == "models.pythia-70m: `lora_r` must be positive"


def test_ppo_temperature_must_be_positive():
    message = config_error(preset="tiny", overrides=["ppo.temperature=0"])
    assert message == "ppo: temperature must be positive: rollouts are sampled, and scored under it"


def test_eval_bootstrap_needs_a_thousand_draws():
    message = config_error(preset="tiny", overrides=["eval.num_bootstrap=999"])
    assert message.startswith("eval: num_bootstrap: 999 is below 1000 draws")
    with pytest.raises(ConfigError, match="^num_bootstrap: 999 is below 1000 draws"):
        EvalConfig(num_bootstrap=999)
    assert EvalConfig(num_bootstrap=1000).num_bootstrap == 1000
    assert load_config(preset="tiny", overrides=["eval.num_bootstrap=1000"]).eval.num_bootstrap == 1000


def test_hub_corpus_without_path(tmp_path):
    text = "extends: tiny\ncorpora:\n  tinystories: {source: hub}\n"
    assert file_error(tmp_path, text) == "corpora.tinystories: a corpus with source 'hub' needs a `path`"


def test_model_key_not_in_models(tmp_path):
    assert file_error(tmp_path, "extends: paper\nmodel: gpt2\n") == (
        "model: 'gpt2' is not one of "
        "['pythia-160m', 'pythia-410m', 'pythia-70m', 'smollm2-135m', 'smollm2-360m']"
    )


def test_corpus_key_not_in_corpora():
    assert config_error(preset="tiny", overrides=["corpus=imdb"]) == (
        "corpus: 'imdb' is not one of ['cnn_dailymail', 'tinystories', 'wikitext']"
    )


def test_invalid_yaml_syntax(tmp_path):
    path = write(tmp_path / "broken.yaml", "extends: tiny\nppo: {steps: 3\n")
    message = config_error(path=path)
    assert message.startswith(f"{path.resolve()}: not valid YAML: ")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path, text):
    path = write(tmp_path / "list.yaml", text)
    assert config_error(path=path) == f"{path.resolve()}: the top level must be a mapping"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert config_error(path=path) == f"config file not found: {path.resolve()}"


def test_empty_file_is_missing_required_keys(tmp_path):
    assert file_error(tmp_path, "") == "model: required key is missing"


def test_unknown_preset():
    assert config_error(preset="huge") == "unknown preset 'huge' (known: paper, smol, tiny, tiny_verifiable)"


def test_exactly_one_of_path_and_preset(tmp_path):
    assert config_error() == "give either a config file or a preset"
    path = write(tmp_path / "c.yaml", "extends: tiny\n")
    assert config_error(path=path, preset="tiny") == "give either a config file or a preset"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------ extends


def test_extends_preset_changes_only_what_the_file_says(tmp_path):
    path = write(tmp_path / "mine.yaml", "extends: tiny\nppo:\n  steps: 3\n")
    config = load_config(path=path)
    tiny = load_config(preset="tiny")
    assert config.ppo.steps == 3
    assert config.ppo.learning_rate == tiny.ppo.learning_rate == 3e-4  # kept by the deep merge
    assert config == dataclasses.replace(tiny, ppo=dataclasses.replace(tiny.ppo, steps=3))


def test_extends_deep_merges_model_entries(tmp_path):
    text = "extends: paper\nmodel: smollm2-360m\nmodels:\n  smollm2-360m: {lora_r: 4}\n"
    config = load_config(path=write(tmp_path / "mine.yaml", text))
    paper = load_config(preset="paper")
    assert config.model_config.lora_r == 4
    assert config.model_config.name_or_path == "HuggingFaceTB/SmolLM2-360M"  # kept
    assert config.model_config.family == "llama"
    assert {k: v for k, v in config.models.items() if k != "smollm2-360m"} == {
        k: v for k, v in paper.models.items() if k != "smollm2-360m"
    }
    assert (config.ppo, config.sft, config.corpora) == (paper.ppo, paper.sft, paper.corpora)


def test_extends_relative_path_resolves_from_the_file(tmp_path, monkeypatch):
    write(tmp_path / "shared" / "root.yaml", "extends: tiny\nseed: 7\nppo: {steps: 5}\n")
    write(tmp_path / "shared" / "base.yaml", "extends: root.yaml\nppo: {ppo_epochs: 3}\n")
    child = write(tmp_path / "exp" / "child.yaml",
                  "extends: ../shared/base.yaml\nppo: {mini_batch_size: 2}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative to the extending file, not the cwd
    config = load_config(path=child)
    tiny = load_config(preset="tiny")
    assert config.seed == 7
    assert (config.ppo.steps, config.ppo.ppo_epochs, config.ppo.mini_batch_size) == (5, 3, 2)
    assert config.ppo.learning_rate == tiny.ppo.learning_rate
    assert config.models == tiny.models
    assert "extends" not in load_raw(child)


def test_extends_cycle_is_an_error(tmp_path):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nseed: 2\n")
    assert config_error(path=a) == f"{a.resolve()}: `extends` forms a cycle"


def test_extends_itself_is_a_cycle(tmp_path):
    a = write(tmp_path / "self.yaml", "extends: self.yaml\n")
    assert config_error(path=a) == f"{a.resolve()}: `extends` forms a cycle"


def test_extends_errors(tmp_path):
    path = write(tmp_path / "x.yaml", "extends: 3\n")
    assert config_error(path=path) == f"{path.resolve()}: extends: expected a preset name or a path"
    path = write(tmp_path / "y.yaml", "extends: huge\n")
    assert config_error(path=path) == "unknown preset 'huge' (known: paper, smol, tiny, tiny_verifiable)"
    path = write(tmp_path / "z.yaml", "extends: missing.yaml\n")
    assert config_error(path=path) == f"config file not found: {(tmp_path / 'missing.yaml').resolve()}"


def test_errors_in_extending_file_still_name_the_path(tmp_path):
    write(tmp_path / "base.yaml", "extends: tiny\n")
    path = write(tmp_path / "child.yaml", "extends: base.yaml\neval: {num_promts: 3}\n")
    assert config_error(path=path).startswith("eval.num_promts: unknown key")


# ---------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        preset="tiny",
        overrides=[
            "ppo.steps=7",
            "ppo.learning_rate=1.5e-4",
            "ppo.init_kl_coef=1",
            "ppo.kl_target=null",
            "sft.neftune_alpha=~",
            "sft.gradient_checkpointing=true",
            "lora.target_modules=[q_proj, v_proj]",
            "device=cuda:1",
            "output_dir=a=b",
            "cache_dir=/tmp/cache",
        ],
    )
    assert config.ppo.steps == 7 and type(config.ppo.steps) is int
    assert config.ppo.learning_rate == 1.5e-4
    assert config.ppo.init_kl_coef == 1.0 and type(config.ppo.init_kl_coef) is float
    assert config.ppo.kl_target is None
    assert config.sft.neftune_alpha is None
    assert config.sft.gradient_checkpointing is True
    assert config.lora.target_modules == ("q_proj", "v_proj")
    assert config.device == "cuda:1"
    assert config.output_dir == "a=b"  # only the first `=` splits
    assert config.cache_dir == "/tmp/cache"


def test_exponent_float_without_dot():
    config = load_config(preset="tiny", overrides=["sft.learning_rate=1e-4", "ppo.learning_rate=5e-6"])
    assert config.sft.learning_rate == 1e-4
    assert config.ppo.learning_rate == 5e-6


def test_override_values_are_validated_like_file_values():
    assert config_error(preset="tiny", overrides=["ppo.steps=ten"]) == (
        "ppo.steps: expected an integer, got 'ten'"
    )
    assert load_config(preset="tiny", overrides=["output_dir="]).output_dir == ""  # empty string
    assert config_error(preset="tiny", overrides=["ppo.steps="]) == (
        "ppo.steps: expected an integer, got ''"
    )
    assert config_error(preset="tiny", overrides=["sft.precision=fp8"]) == (
        "sft.precision: 'fp8' is not one of ['auto', 'bf16', 'fp32']"
    )


def test_last_override_wins():
    assert load_config(preset="tiny", overrides=["ppo.steps=1", "ppo.steps=2"]).ppo.steps == 2


def test_override_nested_dict_entry():
    tiny = load_config(preset="tiny")
    config = load_config(preset="tiny", overrides=["models.pythia-70m.lora_r=4"])
    assert config.models["pythia-70m"].lora_r == 4
    assert config.models["pythia-70m"].tiny == tiny.models["pythia-70m"].tiny
    assert {k: v for k, v in config.models.items() if k != "pythia-70m"} == {
        k: v for k, v in tiny.models.items() if k != "pythia-70m"
    }


def test_override_creates_new_dict_entries():
    config = load_config(
        preset="paper",
        overrides=[
            "models.mine.family=llama",
            "models.mine.lora_r=2",
            "models.mine.name_or_path=/models/mine",
            "corpora.local.kind=wikitext",
            "corpora.local.source=local",
            "corpora.local.path=/data/wiki.txt",
            "model=mine",
            "corpus=local",
        ],
    )
    assert config.model_config.family == "llama"
    assert config.model_config.lora_r == 2
    assert config.model_config.name_or_path == "/models/mine"
    assert config.corpus_config.source == "local"
    assert config.corpus_config.path == "/data/wiki.txt"
    assert len(config.models) == 6 and len(config.corpora) == 4


def test_override_of_unknown_key_is_rejected():
    assert config_error(preset="tiny", overrides=["ppo.bogus=1"]).startswith("ppo.bogus: unknown key")
    assert config_error(preset="tiny", overrides=["models.pythia-70m.lora_rank=4"]).startswith(
        "models.pythia-70m.lora_rank: unknown key"
    )


@pytest.mark.parametrize("override", ["ppo.steps", "=5", ""])
def test_malformed_override(override):
    assert config_error(preset="tiny", overrides=[override]) == (
        f"override {override!r}: expected the form a.b.c=value"
    )


def test_override_into_a_scalar():
    assert config_error(preset="tiny", overrides=["seed.x=1"]) == "seed: is not a section, cannot set seed.x"
    assert config_error(preset="tiny", overrides=["ppo.steps.x=1"]) == (
        "ppo.steps: is not a section, cannot set ppo.steps.x"
    )


def test_apply_overrides_leaves_input_untouched():
    data = {"ppo": {"steps": 1}, "seed": 3}
    result = apply_overrides(data, ["ppo.steps=2", "sft.epochs=1.5"])
    assert data == {"ppo": {"steps": 1}, "seed": 3}
    assert result == {"ppo": {"steps": 2}, "seed": 3, "sft": {"epochs": 1.5}}


def test_config_is_frozen():
    config = load_config(preset="tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ppo.steps = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models["pythia-70m"].lora_r = 1


# ------------------------------------------------------------- round trip, fingerprints


@pytest.mark.parametrize("preset", PRESETS)
def test_to_dict_round_trip(preset):
    config = load_config(preset=preset, overrides=["lora.target_modules=[q_proj, v_proj]"])
    plain = to_dict(config)
    assert plain["lora"]["target_modules"] == ["q_proj", "v_proj"]  # JSON-ready
    assert json.loads(json.dumps(plain)) == plain
    assert config_from_dict(plain) == config
    assert config_from_dict(to_dict(load_config(preset=preset))) == load_config(preset=preset)


def test_fingerprint_is_stable_and_sensitive():
    config = load_config(preset="paper")
    first = fingerprint(config)
    assert len(first) == 16 and all(ch in "0123456789abcdef" for ch in first)
    assert fingerprint(config) == first
    assert fingerprint(load_config(preset="paper")) == first
    changed = load_config(preset="paper", overrides=["ppo.init_kl_coef=0.1"])
    assert fingerprint(changed) != first
    assert fingerprint(changed.ppo) != fingerprint(config.ppo)
    assert fingerprint(changed.sft) == fingerprint(config.sft)
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def _changed_stages(*overrides: str) -> set[str]:
    base = stage_fingerprints(load_config(preset="paper"))
    changed = stage_fingerprints(load_config(preset="paper", overrides=list(overrides)))
    assert set(base) == set(changed) == set(STAGES)
    return {stage for stage in STAGES if base[stage] != changed[stage]}


def test_stage_fingerprints_are_stable():
    config = load_config(preset="paper")
    assert stage_fingerprints(config) == stage_fingerprints(load_config(preset="paper"))
    assert len(set(stage_fingerprints(config).values())) == len(STAGES)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["ppo.init_kl_coef=0.1"], {"ppo", "eval"}),
        (["sft.learning_rate=3.0e-5"], {"sft", "reward", "ppo", "eval"}),
        (["reward.learning_rate=2.0e-5"], {"reward", "ppo", "eval"}),
        (["eval.num_prompts=50"], {"data", "eval"}),  # eval.jsonl changes; the training files do not
        (["data.num_documents=500"], set(STAGES)),
        (["corpus=wikitext"], set(STAGES)),
        (["model=pythia-160m"], {"sft", "reward", "ppo", "eval"}),
        (["models.pythia-70m.lora_r=4"], {"sft", "reward", "ppo", "eval"}),
        (["models.pythia-410m.lora_r=4"], set()),  # another model's entry is irrelevant
        (["output_dir=elsewhere", "device=cpu"], set()),
    ],
)
def test_stage_fingerprint_chain(overrides, expected):
    assert _changed_stages(*overrides) == expected


# ---------------------------------------------------------------------------------- CLI


def test_cli_config_prints_resolved_yaml(capsys):
    argv = ["config", "--preset", "paper", "--model", "smollm2-360m", "ppo.steps=7"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed["ppo"]["steps"] == 7
    assert printed["model"] == "smollm2-360m"
    assert printed["corpus"] == "tinystories"
    assert err == ""
    expected = load_config(preset="paper", overrides=["model=smollm2-360m", "ppo.steps=7"])
    assert config_from_dict(printed) == expected


def test_cli_config_error_returns_2(capsys):
    assert cli.main(["config", "--preset", "tiny", "ppo.bogus=1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "ppo.bogus" in err
    assert err.startswith("slmrl-ray: config error: ppo.bogus: unknown key")


def test_cli_run_reports_config_errors_before_training(capsys):
    assert cli.main(["run", "--preset", "tiny", "--model", "gpt2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("slmrl-ray: config error: model: 'gpt2' is not one of")


@pytest.mark.parametrize("command", ["run", "config"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--config", "--model", "--corpus", "--dataset"):
        assert flag in out, flag
    assert "{paper,smol,tiny,tiny_verifiable}" in out


def test_cli_dataset_is_an_alias_of_corpus(capsys):
    assert cli.main(["config", "--preset", "tiny", "--dataset", "wikitext"]) == 0
    via_dataset = yaml.safe_load(capsys.readouterr().out)
    assert cli.main(["config", "--preset", "tiny", "--corpus", "wikitext"]) == 0
    via_corpus = yaml.safe_load(capsys.readouterr().out)
    assert via_dataset["corpus"] == "wikitext"
    assert via_dataset == via_corpus


def test_cli_config_file_and_flags(tmp_path, capsys):
    path = write(tmp_path / "mine.yaml", "extends: tiny\nppo: {steps: 3}\n")
    argv = ["config", "--config", str(path), "--model", "smollm2-135m", "--corpus", "cnn_dailymail",
            "--output-dir", str(tmp_path / "runs"), "--device", "cpu", "sft.max_steps=5"]
    assert cli.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["model"], printed["corpus"]) == ("smollm2-135m", "cnn_dailymail")
    assert printed["output_dir"] == str(tmp_path / "runs")
    assert printed["device"] == "cpu"
    assert printed["ppo"]["steps"] == 3
    assert printed["sft"]["max_steps"] == 5
    assert printed["ppo"]["learning_rate"] == load_config(preset="tiny").ppo.learning_rate


def test_cli_defaults_to_tiny_preset(capsys):
    assert cli.main(["config"]) == 0
    assert config_from_dict(yaml.safe_load(capsys.readouterr().out)) == load_config(preset="tiny")


def test_cli_rejects_preset_and_config_together(tmp_path, capsys):
    path = write(tmp_path / "c.yaml", "extends: tiny\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["config", "--preset", "tiny", "--config", str(path)])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["config", "--preset", "huge"])
    assert info.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_cli_missing_config_file(tmp_path, capsys):
    path = tmp_path / "absent.yaml"
    assert cli.main(["config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"slmrl-ray: config error: config file not found: {path.resolve()}\n"


def test_the_readme_rewards_example_loads(tmp_path):
    """The YAML under "Rewards, judges and RL algorithms" in the README is a valid config."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Rewards, judges and RL algorithms", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "rewards.yaml"
    path.write_text("extends: tiny\n" + example)
    config = load_config(path)
    assert [rule.kind for rule in config.rewards.rules] == ["regex", "exact_match", "format", "length"]
    assert config.judge.source == "split"
