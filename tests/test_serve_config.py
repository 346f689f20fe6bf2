"""Serve configs and the model catalog: fast, no Ray session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from slmrl_ray.config import ConfigError
from slmrl_ray.serving.config import build_catalog, parse_args
from slmrl_ray.serving.launch import read_source

SERVE_CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("serve_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.stem)
def test_shipped_serve_configs_are_valid_serve_configs_with_strict_args(path):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` check
    assert schema.http_options.host == "127.0.0.1"
    application = config["applications"][0]
    assert application["import_path"] == "slmrl_ray.serving.app:build_app"
    args = parse_args(application["args"])
    assert args.registry and args.policy.num_cpus < 1 or args.policy.num_gpus >= 1


@pytest.mark.parametrize(
    "args, message",
    [
        ({"registry": "x", "limits": {"max_tokenz": 3}}, "limits.max_tokenz: unknown key"),
        ({"registry": "x", "policy": {"num_cpus": "half"}}, "policy.num_cpus: expected a number"),
        ({"registry": "x", "stages": ["reward"]}, r"stages\[0\]: 'reward' is not one of"),
        ({}, "exactly one of `registry` and `artifacts`"),
        ({"artifacts": [{"cell": "a/b", "stage": "dpo", "uri": "/x"}]}, r"artifacts\[0\].stage"),
    ],
)
def test_bad_app_args_name_the_dotted_path(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(args)


def write_registry(folder: Path) -> Path:
    cells = {}
    for cell in ("pythia-70m/tinystories", "smollm2-135m/wikitext"):
        stages = {s: {"uri": f"s3://b/exp/artifacts/{cell}/{s}/fp-{s}/model?endpoint_override=h:1"}
                  for s in ("sft", "ppo", "reward")}
        cells[cell] = {**stages, "fingerprints": {s: f"fp-{s}" for s in ("sft", "ppo", "reward")}}
    path = folder / "report" / "registry.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": 1, "cells": cells}))
    return path


def test_catalog_from_a_registry_names_models_by_stage_and_cell(tmp_path):
    write_registry(tmp_path)
    catalog = build_catalog(parse_args({"registry": str(tmp_path), "cells": ["smollm2-135m/wikitext"],
                                        "stages": ["ppo"]}))
    assert sorted(catalog) == ["ppo/smollm2-135m/wikitext", "reward/smollm2-135m/wikitext"]
    ppo = catalog["ppo/smollm2-135m/wikitext"]
    assert ppo.uri == "s3://b/exp/artifacts/smollm2-135m/wikitext/ppo/fp-ppo/model?endpoint_override=h:1"
    assert ppo.stage_uri == "s3://b/exp/artifacts/smollm2-135m/wikitext/ppo/fp-ppo?endpoint_override=h:1"
    assert ppo.provenance == {"cell": "smollm2-135m/wikitext", "stage": "ppo", "artifact": "fp-ppo"}
    with pytest.raises(ConfigError, match="cells: 'gpt2/x' is not in the registry"):
        build_catalog(parse_args({"registry": str(tmp_path), "cells": ["gpt2/x"]}))
    with pytest.raises(ConfigError, match="no registry.json"):
        build_catalog(parse_args({"registry": str(tmp_path / "elsewhere")}))


def test_serve_command_reads_a_serve_config_or_a_registry(tmp_path):
    args, http = read_source(str(SERVE_CONFIGS[[p.stem for p in SERVE_CONFIGS].index("tiny")]))
    assert http == {"host": "127.0.0.1", "port": 8000} and args["stages"] == ["sft", "ppo"]
    assert read_source(str(tmp_path)) == ({"registry": str(tmp_path)}, {})
