"""`slmrl-ray bench shapes`: the five study models at full size, and the paper grid projected from them.

    slmrl-ray bench shapes [--models pythia-70m,smollm2-135m] [--peak-tflops 989] [a.b.c=value ...]

Each model is built from its published architecture (`FULL_SIZE`, the hub config.json
values; a test checks the parameter counts) with random weights, which cost the same to
run as trained ones, and saved like a hub snapshot with the tiny preset's tokenizer padded
to the model's vocabulary. `bench stages` then runs every stage through the real code at
the paper recipe's batch sizes and lengths (SFT 8 x 4 x 512 packed, RM 8 x 2 pairs up to
512, PPO rollout 32 x 96 new tokens in mini-batches of 4 for 2 epochs, evaluation at 128
new tokens) for a few steps each, on the offline generated corpus.

From those rates `project_grid` projects the full paper recipe of each model x corpus
(5 SFT epochs over 9,500 documents, 2 RM epochs over ~9,200 pairs, 250 PPO steps, 200
evaluation prompts) and the whole 15-configuration grid run one trial after another on
this device, next to the study's own A6000 figures (SPEC 1.4). The per-corpus token counts
are estimates (`PAPER_WORKLOAD`), listed in the JSON; a random-weight policy almost never
samples EOS, so its rollouts and evaluation responses run to the full length: the PPO and
evaluation projections are upper bounds.

SFT model FLOPs utilisation counts LoRA training as 4N + 12 L T d FLOPs per token (N:
weights in matmuls, embedding lookups excluded; frozen weights need no weight gradient;
attention as in PaLM's MFU, not halved for causality), against the device's dense bf16
peak (`PEAK_BF16_TFLOPS` or `--peak-tflops`); the CPU has no entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from slmrl_ray.bench.common import format_table, machine
from slmrl_ray.bench.stages import bench_stages
from slmrl_ray.config import PipelineConfig, apply_overrides, config_from_dict, fingerprint, load_raw, preset_path

# The hub config.json values that set the cost of each study model (SPEC 1).
FULL_SIZE: dict[str, dict] = {
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                       vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    "smollm2-360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         intermediate_size=2560, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
}

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), matched in order on the device name.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("A6000", 154.8), ("L40S", 362.1),
)

# How the bench measures: a few steps of each stage at the paper recipe, on the generated corpus.
MEASURE_OVERRIDES = (
    "corpus=tinystories", "corpora.tinystories.source=generated", "corpora.tinystories.path=null",
    "data.num_documents=600", "sft.max_steps=4", "reward.max_steps=4", "ppo.steps=4",
    "ppo.checkpoint_every=4", "eval.num_prompts=16",
)


@dataclass(frozen=True)
class CorpusWorkload:
    """One corpus at the paper recipe, in the study models' BPE tokens (estimates: chars / 4.3)."""

    tokens_per_document: float  # the SFT text of one document
    tokens_per_pair: float  # chosen + rejected, each as "prompt\n\nresponse" + EOS
    prompt_tokens: float  # a PPO prompt


PAPER_WORKLOAD: dict[str, CorpusWorkload] = {
    # a story of ~900 characters; prompt = its first sentence, chosen = the rest, rejected = half of it
    "tinystories": CorpusWorkload(tokens_per_document=210, tokens_per_pair=330, prompt_tokens=15),
    # "Article: " + article[:1500] + highlights; prompt = article[:800], responses = highlights
    "cnn_dailymail": CorpusWorkload(tokens_per_document=400, tokens_per_pair=510, prompt_tokens=185),
    # a paragraph of ~650 characters; prompt = its first sentence, rejected = 70 % of the rest
    "wikitext": CorpusWorkload(tokens_per_document=160, tokens_per_pair=285, prompt_tokens=30),
}

# The study's reported minutes per configuration on one RTX A6000 (SPEC 1.4): (low, high).
STUDY_A6000_MINUTES = {"sft": (20, 35), "reward": (5, 10), "ppo": (45, 90), "eval": (3, 5)}


def model_config(key: str, tokenizer):
    """The transformers config of a study model at full size, with the tokenizer's special ids."""
    from transformers import GPTNeoXConfig, LlamaConfig

    ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if key.startswith("pythia"):  # GPT-NeoX: untied embeddings, parallel residual, partial rotary
        return GPTNeoXConfig(**FULL_SIZE[key], **ids, tie_word_embeddings=False)
    return LlamaConfig(**FULL_SIZE[key], **ids, tie_word_embeddings=True)  # SmolLM2: tied, grouped-query


def padded_tokenizer(vocab_size: int):
    """The tiny preset's byte-level BPE plus filler tokens up to `vocab_size`, so every id decodes."""
    from slmrl_ray.config import TinyModelConfig
    from slmrl_ray.tiny import pretraining_texts, train_tokenizer

    tiny = TinyModelConfig()
    tokenizer = train_tokenizer(pretraining_texts(tiny.pretrain_documents, tiny.seed), tiny.vocab_size)
    tokenizer.add_tokens([f"<|filler{i}|>" for i in range(vocab_size - len(tokenizer))])
    return tokenizer


def full_size_dir(key: str, cache_dir: Path) -> Path:
    """A random-weight full-size model and its tokenizer, saved like a hub snapshot (cached)."""
    from transformers import AutoModelForCausalLM

    from slmrl_ray.model_cache import save_snapshot

    target = cache_dir / "full-size" / f"{key}-{fingerprint(FULL_SIZE[key])}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = padded_tokenizer(FULL_SIZE[key]["vocab_size"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(key, tokenizer))
    save_snapshot(model, tokenizer, target)
    return target


def measurement_config(key: str, folder: Path, overrides: list[str]) -> PipelineConfig:
    """The paper preset with the model at `folder`, the generated corpus and a few steps per stage."""
    data = load_raw(preset_path("paper"))
    data["models"][key] = {**data["models"][key], "name_or_path": str(folder)}
    return config_from_dict(apply_overrides(data, [f"model={key}", *MEASURE_OVERRIDES, *overrides]))


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights that take part in matmuls (nn.Linear, the output head included; not embedding lookups)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def shape_costs(config, seq_len: int) -> tuple[int, float]:
    """(parameters, LoRA training FLOPs per token at `seq_len`) of a transformers config.

    4N + 12 L T d: forward 2N, input gradients 2N (frozen weights get no weight gradient),
    attention scores and values 4 L T d forward and twice that backward.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    return parameters, 4 * matmul_parameters(model) + 12 * config.num_hidden_layers * seq_len * config.hidden_size


def peak_bf16_flops(device_name: str) -> float | None:
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in device_name:
            return tflops * 1e12
    return None


def measured_rates(rows: list[dict]) -> dict:
    """From `bench stages` rows: the per-unit costs that the projection scales."""
    stage = {row["stage"]: row for row in rows}
    sft, rm, ppo, ev = stage["sft"], stage["reward"], stage["ppo"], stage["eval"]
    return {
        "sft_tokens_per_s": sft["throughput"],
        "rm_tokens_per_s": rm["throughput"] * rm["tokens_per_pair"],
        "ppo_generate_s": ppo["generate_s"],
        "ppo_score_update_s": ppo["score_s"] + ppo["update_s"],
        "ppo_sequence_tokens": ppo["prompt_tokens"] + ppo["response_length"],
        "ppo_response_tokens": ppo["response_length"],
        "eval_s_per_prompt": ev["wall_s"] / ev["num_prompts"],
    }


def paper_cell_minutes(rates: dict, workload: CorpusWorkload, recipe: PipelineConfig) -> dict:
    """Projected minutes of each stage of one configuration at the paper recipe.

    SFT: epochs x training tokens / tokens/s. RM: epochs x pairs x tokens per pair / tokens/s.
    PPO: steps x (generation + (scoring + update) scaled by this corpus's sequence length).
    Evaluation: prompts x seconds per prompt.
    """
    data = recipe.data
    train_docs = data.num_documents - max(1, min(data.max_heldout, int(data.num_documents * data.heldout_fraction)))
    train_pairs = train_docs - max(1, min(data.max_heldout_pairs, int(train_docs * data.pair_heldout_fraction)))
    sft_tokens = recipe.sft.epochs * train_docs * (workload.tokens_per_document + 1)
    rm_tokens = recipe.reward.epochs * train_pairs * workload.tokens_per_pair
    length_ratio = (workload.prompt_tokens + rates["ppo_response_tokens"]) / rates["ppo_sequence_tokens"]
    ppo_step_s = rates["ppo_generate_s"] + rates["ppo_score_update_s"] * length_ratio
    seconds = {
        "sft": sft_tokens / rates["sft_tokens_per_s"],
        "reward": rm_tokens / rates["rm_tokens_per_s"],
        "ppo": recipe.ppo.steps * ppo_step_s,
        "eval": recipe.eval.num_prompts * rates["eval_s_per_prompt"],
    }
    minutes = {stage: value / 60 for stage, value in seconds.items()}
    return {**minutes, "total": sum(minutes.values())}


def project_grid(rates_by_model: dict[str, dict], recipe: PipelineConfig,
                 workloads: dict[str, CorpusWorkload] = PAPER_WORKLOAD) -> dict:
    """Every measured model x corpus at the paper recipe, the grid run serially, and the study's figures."""
    rows = []
    for model, rates in rates_by_model.items():
        for corpus, workload in workloads.items():
            minutes = paper_cell_minutes(rates, workload, recipe)
            rows.append({"model": model, "corpus": corpus, **{f"{k}_min": v for k, v in minutes.items()}})
    study = {stage: tuple(15 * m / 60 for m in span) for stage, span in STUDY_A6000_MINUTES.items()}
    return {
        "cells": rows,
        "grid_hours": sum(row["total_min"] for row in rows) / 60,
        "cells_projected": len(rows),
        "study_a6000_grid_hours": tuple(sum(span[i] for span in study.values()) for i in (0, 1)),
        "study_a6000_stage_hours": study,
        "workload": {corpus: dataclasses.asdict(w) for corpus, w in workloads.items()},
    }


def model_row(key: str, stages: dict, folder: Path, config: PipelineConfig, peak: float | None) -> dict:
    """One model's figures from its `bench stages` result; `folder` holds its config.json (for
    the parameter count and SFT FLOPs). MFU only for bf16 SFT with a known peak."""
    from transformers import AutoConfig

    from slmrl_ray.device import resolve_device, training_precision

    rates = measured_rates(stages["rows"])
    parameters, flops_per_token = shape_costs(AutoConfig.from_pretrained(folder), config.sft.max_length)
    bf16 = training_precision(config.sft.precision, resolve_device(config.device)) == "bf16"
    stage = {row["stage"]: row for row in stages["rows"]}
    return {
        "model": key,
        "params_m": parameters / 1e6,
        "sft_tokens_per_s": rates["sft_tokens_per_s"],
        "sft_tflops": flops_per_token * rates["sft_tokens_per_s"] / 1e12,
        "sft_mfu": flops_per_token * rates["sft_tokens_per_s"] / peak if peak and bf16 else None,
        "rm_pairs_per_s": stage["reward"]["throughput"],
        "ppo_step_s": stage["ppo"]["step_s"],
        "ppo_generate_s": stage["ppo"]["generate_s"],
        "ppo_update_s": stage["ppo"]["update_s"],
        "rollout_tokens_per_s": stage["ppo"]["throughput"],
        "eval_s_per_prompt": rates["eval_s_per_prompt"],
        "peak_mb": stages["peak_memory"].get("cuda_allocated_mb", stages["peak_memory"]["process_rss_mb"]),
    }


def bench_shapes(models: list[str], overrides: list[str] = (), peak_tflops: float | None = None,
                 cache_dir: Path | None = None) -> dict:
    """Measure each full-size model's stages, then project the paper grid from the rates."""
    from slmrl_ray.config import load_config, to_dict
    from slmrl_ray.model_cache import default_cache_dir

    cache_dir = cache_dir or default_cache_dir()
    peak = peak_tflops * 1e12 if peak_tflops else peak_bf16_flops(machine()["device"])
    rows, rates_by_model, stage_rows, settings = [], {}, {}, {}
    for key in models:
        folder = full_size_dir(key, cache_dir)
        config = measurement_config(key, folder, list(overrides))
        settings[key] = to_dict(config)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stages = bench_stages(config)
        stage_rows[key] = stages["rows"]
        rates_by_model[key] = measured_rates(stages["rows"])
        rows.append(model_row(key, stages, folder, config, peak))
    projection = project_grid(rates_by_model, load_config(preset="paper"))
    return {"rows": rows, "projection": projection, "peak_flops": peak, "rates": rates_by_model,
            "stages": stage_rows, "shapes_settings": settings}


def format_projection(projection: dict) -> str:
    """The projected paper grid as markdown: one row per configuration, then the totals."""
    low, high = projection["study_a6000_grid_hours"]
    lines = [
        "\nprojected paper recipe per configuration (minutes, this device, one trial at a time):",
        format_table(projection["cells"]),
        f"\nprojected grid ({projection['cells_projected']} configurations): {projection['grid_hours']:.2f} h",
        f"the study on one RTX A6000 (SPEC 1.4), 15 configurations: {low:.1f}-{high:.1f} h",
    ]
    return "\n".join(lines)
