"""`slmrl-ray bench`: the output's shape on tiny sizes (a smoke test, not a speed test), and the
Tune-overhead arithmetic on hand-made trial records."""

from __future__ import annotations

import json
import math

import pytest

from slmrl_ray.cli import main
from slmrl_ray.storage import Storage

TINY = ["--preset", "tiny", "--model", "pythia-70m", "--corpus", "tinystories", "data.num_documents=300",
        "sft.max_steps=4", "reward.max_steps=4", "ppo.steps=2", "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4",
        "ppo.max_new_tokens=8", "eval.num_prompts=4", "eval.max_new_tokens=8", "eval.num_bootstrap=1000"]


@pytest.mark.slow
def test_bench_stages_reports_every_stage_with_throughputs(tmp_path, capsys):
    out = tmp_path / "stages.json"
    runs = tmp_path / "runs"
    assert main(["bench", "stages", *TINY, "--out", str(out), "--keep-run", "--output-dir", str(runs)]) == 0
    result = json.loads(out.read_text())
    rows = {row["stage"]: row for row in result["rows"]}
    assert list(rows) == ["data", "sft", "reward", "ppo", "eval"]
    for stage, unit in (("sft", "tokens/s"), ("reward", "pairs/s"), ("ppo", "rollout tokens/s")):
        assert rows[stage]["unit"] == unit and math.isfinite(rows[stage]["throughput"]) and rows[stage]["throughput"] > 0
    ppo = rows["ppo"]
    assert ppo["step_s"] == pytest.approx(ppo["generate_s"] + ppo["score_s"] + ppo["update_s"])
    assert 0 < ppo["response_length"] <= 8 and ppo["prompt_tokens"] > 0 and rows["eval"]["num_prompts"] == 4
    assert rows["reward"]["tokens_per_pair"] > 2 * 3  # two sequences of prompt, blank line, response and EOS
    assert result["machine"]["device"] and result["machine"]["torch"]
    assert result["settings"]["ppo"]["steps"] == 2 and result["peak_memory"]["process_rss_mb"] > 0
    assert "| sft |" in capsys.readouterr().out
    # --keep-run leaves the measured run behind, and refuses to measure over it (its stages would be skipped).
    kept = runs / "pythia-70m" / "tinystories"
    assert json.loads((kept / "eval" / "stage.json").read_text())["wall_time_s"] > 0
    assert main(["bench", "stages", *TINY, "--keep-run", "--output-dir", str(runs)]) != 0
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_rollout_compares_with_bare_generate(tmp_path):
    out = tmp_path / "rollout.json"
    assert main(["bench", "rollout", *TINY, "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["batch"] == 4 and row["new_tokens"] == 8
    assert row["overhead_ratio"] == pytest.approx(row["rollout_s"] / row["bare_generate_s"])


@pytest.mark.slow
def test_bench_rl_times_ppo_grpo_and_rloo_at_equal_batch_and_updates(tmp_path, capsys):
    out = tmp_path / "rl.json"
    assert main(["bench", "rl", *TINY, "ppo.num_generations=2", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [row["algorithm"] for row in rows] == ["ppo", "grpo", "rloo"]
    assert [row["prompts"] for row in rows] == [4, 2, 2] and {row["responses"] for row in rows} == {4}
    assert {row["updates"] for row in rows} == {2}  # ppo_epochs 2 x rollout 4 / mini-batch 4, for all three
    assert all(math.isfinite(row["step_s"]) and row["step_s"] > 0 for row in rows)
    assert rows[0]["ratio_to_ppo"] == 1
    assert rows[1]["ratio_to_ppo"] == pytest.approx(rows[1]["step_s"] / rows[0]["step_s"])
    assert result["machine"]["device"] and "| grpo |" in capsys.readouterr().out


def test_bench_tune_measures_overhead_from_trial_records(tmp_path):
    results = Storage.from_uri(str(tmp_path)).child("results")
    # Two trials side by side (0-10 s, 1-9 s), then one alone (12-20 s): concurrency 2.
    for name, start, end, busy in (("a", 100, 110, 10), ("b", 101, 109, 8), ("c", 112, 120, 8)):
        results.child(f"{name}.json").write_json({"started_at": start, "ended_at": end, "trial_wall_time_s": busy})
    # The same three trials one at a time (packed less tightly): 30 s.
    serial = Storage.from_uri(str(tmp_path / "serial")).child("results")
    for name, start, end in (("a", 0, 10), ("b", 10, 18), ("c", 20, 30)):
        serial.child(f"{name}.json").write_json({"started_at": start, "ended_at": end, "trial_wall_time_s": end - start})
    out = tmp_path / "tune.json"
    assert main(["bench", "tune", str(tmp_path / "serial"), str(tmp_path), "--out", str(out)]) == 0
    first, row = json.loads(out.read_text())["rows"]
    assert (row["trials"], row["concurrency"], row["span_s"], row["trial_sum_s"]) == (3, 2, 20, 26)
    assert row["overhead_ratio"] == pytest.approx(20 / 13)
    assert (first["concurrency"], first["span_s"], first["speedup_vs_first"]) == (1, 30, 1.0)
    assert row["speedup_vs_first"] == pytest.approx(30 / 20)
    assert main(["bench", "tune", str(tmp_path / "empty")]) == 1


# ------------------------------------------------------------------ full-size shapes and the projection

PUBLISHED_PARAMETERS = {"pythia-70m": 70_426_624, "pythia-160m": 162_322_944, "pythia-410m": 405_334_016,
                        "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120}


def test_full_size_shapes_have_the_published_parameter_counts():
    from types import SimpleNamespace

    from slmrl_ray.bench.shapes import FULL_SIZE, model_config, shape_costs
    from slmrl_ray.config import load_config

    assert set(FULL_SIZE) == set(load_config(preset="paper").models) == set(PUBLISHED_PARAMETERS)
    tokenizer = SimpleNamespace(eos_token_id=0, pad_token_id=1)
    flops = {}
    for key, published in PUBLISHED_PARAMETERS.items():
        parameters, flops[key] = shape_costs(model_config(key, tokenizer), 512)
        assert parameters == published, key
    # Pythia-70M by hand: 6 layers x (qkv 512x1536 + dense 512x512 + 512x2048 + 2048x512) + the 512x50304 head.
    matmul = 6 * (512 * 1536 + 512 * 512 + 2 * 512 * 2048) + 512 * 50304
    assert flops["pythia-70m"] == 4 * matmul + 12 * 6 * 512 * 512


def test_lora_training_flops_per_token_by_hand():
    from transformers import GPTNeoXConfig

    from slmrl_ray.bench.shapes import shape_costs

    config = GPTNeoXConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           vocab_size=10, tie_word_embeddings=False)
    parameters, flops = shape_costs(config, seq_len=4)
    # matmul weights: qkv 8x24, dense 8x8, h->4h 8x32, 4h->h 32x8, output head 8x10 (the input embedding is a lookup)
    matmul = 192 + 64 + 256 + 256 + 80
    assert flops == 4 * matmul + 12 * 1 * 4 * 8
    assert parameters > matmul  # embeddings, biases and layer norms count as parameters, not matmul FLOPs


def test_peak_flops_are_looked_up_by_device_name():
    from slmrl_ray.bench.shapes import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA RTX A6000") == 154.8e12
    assert peak_bf16_flops("CPU (2 cores)") is None


def test_paper_grid_projection_by_hand():
    from slmrl_ray.bench.shapes import CorpusWorkload, paper_cell_minutes, project_grid
    from slmrl_ray.config import load_config

    recipe = load_config(preset="paper")  # 10,000 documents (500 held out), 300 held-out pairs, 250 PPO steps
    rates = {"sft_tokens_per_s": 1000.0, "rm_tokens_per_s": 500.0, "ppo_generate_s": 2.0, "ppo_score_update_s": 1.0,
             "ppo_sequence_tokens": 100.0, "ppo_response_tokens": 90.0, "eval_s_per_prompt": 0.5}
    workload = CorpusWorkload(tokens_per_document=99, tokens_per_pair=200, prompt_tokens=10)
    minutes = paper_cell_minutes(rates, workload, recipe)
    assert minutes["sft"] * 60 == pytest.approx(5 * 9500 * 100 / 1000)  # epochs x documents x (tokens + EOS)
    assert minutes["reward"] * 60 == pytest.approx(2 * 9200 * 200 / 500)  # epochs x pairs x tokens per pair
    assert minutes["ppo"] * 60 == pytest.approx(250 * (2.0 + 1.0 * (10 + 90) / 100))
    assert minutes["eval"] * 60 == pytest.approx(200 * 0.5)
    assert minutes["total"] == pytest.approx(sum(minutes[s] for s in ("sft", "reward", "ppo", "eval")))
    projection = project_grid({"a": rates, "b": rates}, recipe, {"x": workload})
    assert projection["cells_projected"] == 2
    assert projection["grid_hours"] == pytest.approx(2 * minutes["total"] / 60)
    assert projection["study_a6000_grid_hours"] == pytest.approx((15 * 73 / 60, 15 * 140 / 60))


@pytest.mark.slow
def test_bench_shapes_measures_each_model_and_projects_the_grid(tmp_path, monkeypatch, capsys):
    from slmrl_ray.bench import shapes as bench_shapes

    # Small stand-ins for the full-size shapes (both families): the CI smoke test checks the output, not a speed.
    monkeypatch.setitem(bench_shapes.FULL_SIZE, "pythia-70m", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=2048,
        max_position_embeddings=1024, rotary_pct=0.25))
    monkeypatch.setitem(bench_shapes.FULL_SIZE, "smollm2-135m", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=1536, max_position_embeddings=1024))
    small = ["data.num_documents=200", "sft.max_steps=2", "sft.batch_size=2", "sft.grad_accum=1", "sft.max_length=64",
             "reward.max_steps=2", "reward.batch_size=2", "reward.grad_accum=1", "reward.max_length=64",
             "ppo.steps=2", "ppo.checkpoint_every=2", "ppo.rollout_batch_size=4", "ppo.max_new_tokens=8",
             "eval.num_prompts=4", "eval.max_new_tokens=8", "eval.num_bootstrap=1000"]
    out = tmp_path / "shapes.json"
    models = ["pythia-70m", "smollm2-135m"]
    argv = ["bench", "shapes", "--models", ",".join(models), "--peak-tflops", "100", *small, "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [row["model"] for row in result["rows"]] == models
    for row in result["rows"]:
        assert row["sft_tokens_per_s"] > 0 and row["rollout_tokens_per_s"] > 0 and row["rm_pairs_per_s"] > 0
        assert row["sft_mfu"] is None  # fp32 on the CPU: no bf16 peak to compare with
    for key in models:
        settings = result["shapes_settings"][key]
        assert "full-size" in settings["models"][key]["name_or_path"] and settings["model"] == key
        assert settings["ppo"]["max_new_tokens"] == 8 and settings["corpora"]["tinystories"]["source"] == "generated"
        stages = {row["stage"]: row for row in result["stages"][key]}
        assert stages["reward"]["tokens_per_pair"] > 0 and stages["ppo"]["prompt_tokens"] > 0
    projection = result["projection"]
    assert [(c["model"], c["corpus"]) for c in projection["cells"]] == [
        (m, c) for m in models for c in ("tinystories", "cnn_dailymail", "wikitext")]
    for cell in projection["cells"]:
        assert cell["total_min"] == pytest.approx(sum(cell[f"{s}_min"] for s in ("sft", "reward", "ppo", "eval")))
    assert projection["grid_hours"] == pytest.approx(sum(c["total_min"] for c in projection["cells"]) / 60)
    assert "projected grid (6 configurations)" in capsys.readouterr().out
    assert main(["bench", "shapes", "--models", "gpt2"]) == 2
