"""The `slmrl-ray` command line.

    slmrl-ray run --preset tiny --model pythia-70m --corpus tinystories
    slmrl-ray run --config my.yaml ppo.init_kl_coef=0.1 ppo.steps=100
    slmrl-ray config --preset paper --model smollm2-360m      # print the resolved config

    slmrl-ray grid tune_configs/tiny_grid.yaml              # every cell as a Ray Tune trial
    slmrl-ray search tune_configs/tiny_search.yaml          # Optuna over PPO KL coef and LR; report/budgets.yaml
    slmrl-ray resume ~/slmrl_ray_results/tiny-grid          # continue after a crash (any URI)
    slmrl-ray report s3://bucket/slmrl-ray/tiny-grid        # results table, plots, registry.json
    slmrl-ray serve ~/slmrl_ray_results/tiny-grid           # OpenAI-compatible HTTP on 127.0.0.1
    slmrl-ray bench stages --preset tiny                    # measured speed (also rollout, rl, tune, serve)
    slmrl-ray rm-eval --run runs/pythia-70m/tinystories     # RewardBench-style RM accuracy tables
    slmrl-ray train-rm --base PATH_OR_HUB --pairs prefs.jsonl --output-dir rms/mine  # an external RM

`run` executes one configuration end to end without Ray, resuming at the first
unfinished stage when rerun, and prints the study's results row. Trailing `a.b.c=value`
arguments override any config field (of the pipeline config for `run`, of the tune
config for `grid` and `search`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import yaml

from slmrl_ray.artifacts import STAGES
from slmrl_ray.config import ConfigError, PRESETS_DIR, load_config, to_dict
from slmrl_ray.tuning.config import ExperimentError


class CommandError(Exception):
    """A command's user error (an unreadable input file, say): `main` prints `slmrl-ray: <message>`
    and exits with `status`, without a traceback."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    source.add_argument(
        "--preset", choices=presets, help="a shipped preset (default: tiny, the offline demo)"
    )
    source.add_argument("--config", metavar="FILE", help="a YAML config file (may say `extends: tiny`)")
    parser.add_argument("--model", help="model key, e.g. pythia-70m, smollm2-135m")
    parser.add_argument("--corpus", "--dataset", dest="corpus", help="corpus key: tinystories, cnn_dailymail, wikitext")
    parser.add_argument("--output-dir", help="where run folders go (default from the config: runs)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. ppo.steps=100 sft.learning_rate=1e-4"
    )


def _config_from_args(args: argparse.Namespace):
    overrides = []
    for key, value in (("model", args.model), ("corpus", args.corpus),
                       ("output_dir", args.output_dir), ("device", args.device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides.extend(args.overrides)
    if args.config:
        return load_config(path=args.config, overrides=overrides)
    return load_config(preset=args.preset or "tiny", overrides=overrides)


def _quiet_libraries() -> None:
    """Keep progress bars and our own lines; drop the libraries' load reports and hints."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()


def cmd_run(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    _quiet_libraries()
    from slmrl_ray.pipeline import format_row, results_row, run_pipeline

    stages = args.stages or list(STAGES)
    print(f"slmrl-ray: {config.model} x {config.corpus} -> {config.output_dir}/{config.model}/{config.corpus}")
    results = run_pipeline(config, stages=stages)
    if "eval" in results:
        print()
        print(format_row(results_row(results["eval"], results)))
    else:
        print(json.dumps(results, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from slmrl_ray.tuning.config import load_tune_config

    experiment = load_tune_config(args.tune_config, args.overrides)
    _quiet_libraries()
    from slmrl_ray.tuning.experiment import run_experiment

    run_experiment(experiment, args.command)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from slmrl_ray.tuning.experiment import resume_experiment

    resume_experiment(args.uri)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from slmrl_ray.tuning.experiment import MANIFEST, write_report
    from slmrl_ray.storage import Storage

    root = Storage.from_uri(args.uri)
    if not root.child(MANIFEST).is_file():
        raise ExperimentError(f"no {MANIFEST} under {root.uri}: not an slmrl-ray experiment")
    write_report(root)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from slmrl_ray.serving.launch import serve_forever

    _quiet_libraries()
    serve_forever(args.source, host=args.host, port=args.port, api_key=args.api_key, insecure=args.insecure)
    return 0


# ----------------------------------------------------------------------------- slmrl-ray bench <what>

def _bench_config(args: argparse.Namespace):
    config = _config_from_args(args)
    _quiet_libraries()
    return config


def cmd_bench_stages(args: argparse.Namespace) -> int:
    config = _bench_config(args)
    from slmrl_ray.bench.common import report
    from slmrl_ray.bench.stages import bench_stages

    report("stages", bench_stages(config, keep=args.keep_run), to_dict(config), args.out)
    return 0


def cmd_bench_rollout(args: argparse.Namespace) -> int:
    config = _bench_config(args)
    from slmrl_ray.bench.common import report
    from slmrl_ray.bench.stages import bench_rollout

    report("rollout", bench_rollout(config, args.repeats), to_dict(config), args.out)
    return 0


def cmd_bench_rl(args: argparse.Namespace) -> int:
    config = _bench_config(args)
    from slmrl_ray.bench.common import report
    from slmrl_ray.bench.stages import bench_rl

    report("rl", bench_rl(config, args.repeats), to_dict(config), args.out)
    return 0


def cmd_bench_shapes(args: argparse.Namespace) -> int:
    from slmrl_ray.bench.common import report
    from slmrl_ray.bench.shapes import FULL_SIZE, bench_shapes, format_projection

    _quiet_libraries()
    models = args.models.split(",") if args.models else list(FULL_SIZE)
    unknown = sorted(set(models) - set(FULL_SIZE))
    if unknown:
        raise ConfigError(f"--models: unknown {', '.join(unknown)} (known: {', '.join(FULL_SIZE)})")
    result = bench_shapes(models, args.overrides, args.peak_tflops)
    report("shapes", result, {"models": models, "overrides": args.overrides, "peak_tflops": args.peak_tflops},
           args.out)
    print(format_projection(result["projection"]))
    return 0


def cmd_bench_tune(args: argparse.Namespace) -> int:
    from slmrl_ray.bench.common import report
    from slmrl_ray.bench.tune import bench_tune

    report("tune", bench_tune(args.uri), {"experiments": args.uri}, args.out)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from slmrl_ray.bench.serve import run

    return run(args)


def _add_stage_bench_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    _add_config_arguments(parser)
    parser.add_argument("--out", help=f"JSON output (default bench_{name}.json)")
    if name == "stages":
        parser.add_argument("--keep-run", action="store_true",
                            help="run in --output-dir (or the config's output_dir) and keep the run, instead of a "
                            "temporary folder; the cell's folder there must be empty")
    if name == "rollout":
        parser.add_argument("--repeats", type=int, default=5)
    if name == "rl":
        parser.add_argument("--repeats", type=int, default=3, help="timed steps per algorithm")


def _add_shapes_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="comma-separated model keys (default: all five)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for SFT MFU "
                        "(default: looked up from the GPU's name)")
    parser.add_argument("--out", help="JSON output (default bench_shapes.json)")
    parser.add_argument("overrides", nargs="*", metavar="a.b.c=value",
                        help="changes to the measurement config, e.g. sft.max_steps=10")


def _add_tune_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", metavar="PATH_OR_URI", nargs="+",
                        help="the experiment folder, <storage_path>/<name>; several: each one's speed-up over the first")
    parser.add_argument("--out", help="JSON output (default bench_tune.json)")


def _add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from slmrl_ray.bench.serve import add_arguments  # shared with `python -m slmrl_ray.bench.serve`

    add_arguments(parser)


_SHAPES_HELP = ("the five study models at full size (random weights): every stage at the paper recipe's "
                "batches and lengths, and the paper grid projected from the rates")
_SHAPES_DESCRIPTION = ("Build each study model's published architecture with random weights, run every stage for a "
                       "few steps at the paper recipe's batch sizes and lengths, and project the full "
                       "15-configuration grid.")
_SERVE_HELP = "Ray Serve against a naive one-process server (see slmrl_ray.bench.serve)"

# `slmrl-ray bench <name>`: (help, description, add_arguments, run).
BENCH_TARGETS = {
    "stages": ("every stage of one configuration, from scratch", "every stage of one configuration, from scratch",
               partial(_add_stage_bench_arguments, name="stages"), cmd_bench_stages),
    "rollout": ("one PPO rollout against bare generate", "one PPO rollout against bare generate",
                partial(_add_stage_bench_arguments, name="rollout"), cmd_bench_rollout),
    "rl": ("our PPO against TRL's GRPO and RLOO: step time at equal batch and updates",
           "our PPO against TRL's GRPO and RLOO: step time at equal batch and updates",
           partial(_add_stage_bench_arguments, name="rl"), cmd_bench_rl),
    "shapes": (_SHAPES_HELP, _SHAPES_DESCRIPTION, _add_shapes_bench_arguments, cmd_bench_shapes),
    "tune": ("Tune's overhead for a finished grid or search", None, _add_tune_bench_arguments, cmd_bench_tune),
    "serve": (_SERVE_HELP, _SERVE_HELP, _add_serve_bench_arguments, cmd_bench_serve),
}


def _add_bench_command(commands) -> None:
    command = commands.add_parser(
        "bench", help="measure the speed of the stages, PPO rollouts, a Tune experiment or serving",
        description="Print a markdown table of measured speeds and write them as JSON with the machine, "
        "library versions and settings.",
    )
    targets = command.add_subparsers(dest="target", required=True)
    for name, (summary, description, add_arguments, run) in BENCH_TARGETS.items():
        target = targets.add_parser(name, help=summary, description=description)
        add_arguments(target)
        target.set_defaults(func=run)


def cmd_rm_eval(args: argparse.Namespace) -> int:
    from slmrl_ray.rm_eval import RMEvalError, format_report, run_rm_eval

    _quiet_libraries()
    try:
        report = run_rm_eval(
            args.reward_models or (), args.runs or (), args.dataset, args.name, args.split, args.subset_column,
            args.max_per_subset, args.categories, args.device, args.max_length, args.batch_size,
        )
    except RMEvalError as error:
        raise CommandError(f"rm-eval: {error}") from error
    print(format_report(report))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.output}")
    return 0


class _RevisionAction(argparse.Action):
    """`--revision REV` pins the `--reward-model` given just before it."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = getattr(namespace, "reward_models", None)
        if not models:
            parser.error("--revision must follow the --reward-model it pins")
        models[-1] = (models[-1][0], value)


def _add_rm_eval_command(commands) -> None:
    command = commands.add_parser(
        "rm-eval", help="RewardBench-style pairwise accuracy of reward models, per subset and category",
        description="Score (prompt, chosen, rejected) pairs with each reward model and print per-category "
        "(Chat, Chat Hard, Safety, Reasoning, Average) and per-subset accuracy tables. The dataset defaults "
        "to the first --run's held-out pairs, else allenai/reward-bench (split filtered).",
    )
    command.add_argument("--reward-model", dest="reward_models", action="append", metavar="PATH_OR_HUB_ID",
                         type=lambda value: (value, None), help="an external sequence-classification RM (repeatable)")
    command.add_argument("--revision", action=_RevisionAction, help="hub revision of the preceding --reward-model")
    command.add_argument("--run", dest="runs", action="append", metavar="RUN_DIR",
                         help="a pipeline run folder (e.g. runs/pythia-70m/tinystories): its reward/model "
                         "and reward/judge (repeatable)")
    command.add_argument("--dataset", help="hub dataset id or local .jsonl/.json/.parquet file")
    command.add_argument("--name", help="hub dataset config name")
    command.add_argument("--split", default="filtered", help="hub split (default filtered)")
    command.add_argument("--subset-column", default="subset", help="column naming each pair's subset")
    command.add_argument("--max-per-subset", type=int, metavar="N", help="evaluate at most N pairs per subset")
    command.add_argument("--categories", metavar="FILE", help="YAML/JSON mapping category -> list of subsets "
                         "(default: RewardBench's)")
    command.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    command.add_argument("--max-length", type=int, default=512, help="token limit of external RMs (default 512)")
    command.add_argument("--batch-size", type=int, default=16, help="scoring batch size of external RMs")
    command.add_argument("--output", metavar="FILE.json", help="write every number and the settings as JSON")
    command.set_defaults(func=cmd_rm_eval)


def _add_serve_command(commands) -> None:
    command = commands.add_parser(
        "serve", help="serve the policies and reward models of an experiment over HTTP",
        description="Start the Ray Serve application (OpenAI-compatible /v1/completions, "
        "/v1/chat/completions, plus /v1/rewards, /v1/compare, /v1/best_of_n) and print its URL. "
        "SOURCE is a Serve config (serve_configs/*.yaml), a registry.json, or an experiment folder or URI.",
    )
    command.add_argument("source", metavar="SOURCE")
    command.add_argument("--host", default=None, help="bind address (default 127.0.0.1, or the config's)")
    command.add_argument("--port", type=int, default=None, help="port (default 8000, or the config's)")
    command.add_argument("--api-key", default=None,
                         help="require `Authorization: Bearer KEY` on every route but /health "
                              "(default: $SLMRL_RAY_API_KEY; none on 127.0.0.1)")
    command.add_argument("--insecure", action="store_true",
                         help="serve on a non-loopback --host without an API key")
    command.set_defaults(func=cmd_serve)


def _add_tune_commands(commands) -> None:
    for name, summary in (
        ("grid", "run every (model, corpus) cell of a tune config as a Ray Tune trial"),
        ("search", "Optuna search over the PPO KL coefficient, learning rate (and steps), per cell"),
    ):
        command = commands.add_parser(
            name, help=summary,
            description=f"{summary[0].upper()}{summary[1:]}. Artifacts and checkpoints go to the "
            "config's storage_path (a folder, NFS path or s3://, gs:// URI); ends with the report.",
        )
        command.add_argument("tune_config", metavar="TUNE_CONFIG", help="a file from tune_configs/")
        command.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                             help="tune-config overrides, e.g. storage_path=s3://bucket/x resources.gpu=0.5")
        command.set_defaults(func=cmd_tune)
    for name, summary, description, func in (
        ("resume", "continue an interrupted grid or search",
         "Continue a grid or search from its storage (after a crash or a killed driver): "
         "finished stages are fetched, unfinished trials resume from their last checkpoint.", cmd_resume),
        ("report", "write the results table, plots and registry.json of an experiment",
         "Read the finished cells of a grid or search (no Ray needed) and write "
         "report/results.{md,csv,json}, PNG plots and registry.json under the experiment folder.", cmd_report),
    ):
        command = commands.add_parser(name, help=summary, description=description)
        command.add_argument("uri", metavar="PATH_OR_URI", help="the experiment folder: <storage_path>/<name>")
        command.set_defaults(func=func)


def cmd_train_rm(args: argparse.Namespace) -> int:
    from slmrl_ray.data import PreferencePair, load_jsonl, split_pairs

    try:
        pairs = load_jsonl(args.pairs, PreferencePair)
        heldout = load_jsonl(args.heldout, PreferencePair) if args.heldout else []
    except (OSError, ValueError, TypeError) as error:  # a missing file, bad JSON, a row without prompt/chosen/rejected
        raise CommandError(f"train-rm: cannot read preference pairs: {error}", status=2) from error
    if not args.heldout and args.heldout_fraction > 0:
        pairs, heldout = split_pairs(pairs, args.seed, args.heldout_fraction, max_heldout=len(pairs))
    _quiet_libraries()
    from slmrl_ray.external_rm import train_external_reward_model

    metrics = train_external_reward_model(
        args.base, pairs, args.output_dir, heldout=heldout or None, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, max_length=args.max_length,
        use_chat_template=args.chat_template, seed=args.seed, device=args.device, lora=args.lora,
        lora_r=args.lora_r, revision=args.revision,
    )
    print(json.dumps(metrics, indent=2))
    print(f"\nscore with it: rewards.model.name_or_path={args.output_dir} "
          f"(or judge.source=external judge.model.name_or_path={args.output_dir})")
    return 0


def _add_train_rm_command(commands) -> None:
    command = commands.add_parser(
        "train-rm", help="fine-tune any sequence classifier as a reward model on your preference pairs",
        description="Train a Bradley-Terry reward model (TRL RewardTrainer) from a hub model or folder, encoder "
        "(BERT/MiniLM) or decoder, on a .jsonl of {prompt, chosen, rejected}; save it (safetensors + tokenizer, "
        "metrics.json) for rewards.model or judge.model. Held-out accuracy is measured on the saved model.",
    )
    command.add_argument("--base", required=True, metavar="PATH_OR_HUB_ID", help="the model to start from")
    command.add_argument("--revision", help="hub revision of --base")
    command.add_argument("--pairs", required=True, metavar="FILE.jsonl", help="training pairs: prompt, chosen, rejected")
    heldout = command.add_mutually_exclusive_group()
    heldout.add_argument("--heldout", metavar="FILE.jsonl", help="held-out pairs for the accuracy")
    heldout.add_argument("--heldout-fraction", type=float, default=0.1,
                         help="hold out this share of --pairs instead (default 0.1; 0: no held-out accuracy)")
    command.add_argument("--output-dir", required=True, help="where the reward model is saved")
    command.add_argument("--epochs", type=float, default=1.0)
    command.add_argument("--max-steps", type=int, default=-1, help="> 0 overrides --epochs")
    command.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    command.add_argument("--learning-rate", type=float, default=5e-5)
    command.add_argument("--max-length", type=int, default=512, help="tokens per (prompt, response)")
    command.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                         help="encode a text pair even when the tokenizer has a chat template")
    command.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                         help="train a LoRA and merge it (default: only for models above 300M parameters)")
    command.add_argument("--lora-r", type=int, default=16)
    command.add_argument("--seed", type=int, default=42)
    command.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    command.set_defaults(func=cmd_train_rm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slmrl-ray",
        description="RLHF for small language models: data -> SFT (LoRA) -> reward model -> PPO -> evaluation.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run one configuration end to end (no Ray needed)",
        description="Run one (model, corpus) configuration end to end. Finished stages are "
        "skipped on a rerun; PPO resumes from its last checkpoint. Ends with the results row.",
    )
    _add_config_arguments(run)
    run.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages (in order)")
    run.set_defaults(func=cmd_run)
    show = commands.add_parser(
        "config",
        help="print the resolved config as YAML",
        description="Print the fully resolved config (preset or file, plus overrides) as YAML; "
        "a good starting point for your own config file.",
    )
    _add_config_arguments(show)
    show.set_defaults(func=cmd_config)
    _add_tune_commands(commands)
    _add_serve_command(commands)
    _add_bench_command(commands)
    _add_rm_eval_command(commands)
    _add_train_rm_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:  # the one place where a user error becomes a line and an exit status
        message, status = f"config error: {error}", 2
    except ExperimentError as error:
        message, status = str(error), 1
    except CommandError as error:
        message, status = str(error), error.status
    print(f"slmrl-ray: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
