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


CELLS = ("pythia-70m/tinystories", "smollm2-135m/wikitext")
STAGES = ("sft", "reward", "ppo")


def write_experiment(folder: Path) -> Path:
    """A finished experiment as serving sees it: its manifest, committed stages (a `config.json`
    naming each) and `report/registry.json`; returns its root."""
    from slmrl_ray.storage import ArtifactStore
    from slmrl_ray.tuning.config import load_tune_config
    from slmrl_ray.tuning.experiment import experiment_root, write_manifest
    from slmrl_ray.tuning.report import registry

    grid = Path(__file__).resolve().parents[1] / "tune_configs" / "tiny_grid.yaml"
    experiment = load_tune_config(grid, [f"storage_path={folder}", "name=exp"])
    root = experiment_root(experiment)
    write_manifest(experiment, "grid", root)
    store, records = ArtifactStore(root.child("artifacts")), []
    for cell in CELLS:
        model, corpus = cell.split("/")
        fingerprints = {stage: f"{stage}-{model}-{corpus}" for stage in STAGES}
        for stage, fingerprint in fingerprints.items():
            stage_dir = folder / "stages" / cell / stage
            (stage_dir / "model").mkdir(parents=True)
            (stage_dir / "model" / "model.safetensors").write_bytes(b"weights")
            (stage_dir / "config.json").write_text(json.dumps({"made": f"{stage}/{cell}"}))
            assert store.publish_folder(stage_dir, model, corpus, stage, fingerprint)
        records.append({"experiment": "exp", "kind": "grid", "trial_id": f"t-{model}", "model": model,
                        "corpus": corpus, "params": {}, "objective": None, "diverged": False,
                        "fingerprints": fingerprints, "metrics": {},
                        "evaluation": {"delta_reward": 0.5, "analytical_win_rate": 0.6}})
    root.child("report", "registry.json").write_json(registry(records))
    return Path(root.path)


def test_catalog_from_a_registry_names_models_by_stage_and_cell(tmp_path):
    root = write_experiment(tmp_path)
    catalog = build_catalog(parse_args({"registry": str(root), "cells": ["smollm2-135m/wikitext"],
                                        "stages": ["ppo"]}))
    assert sorted(catalog) == ["ppo/smollm2-135m/wikitext", "reward/smollm2-135m/wikitext"]
    ppo = catalog["ppo/smollm2-135m/wikitext"]
    assert json.loads((Path(ppo.stage_uri) / "config.json").read_text()) == {"made": "ppo/smollm2-135m/wikitext"}
    assert ppo.uri == ppo.stage_uri + "/model" and (Path(ppo.uri) / "model.safetensors").is_file()
    assert ppo.provenance == {"cell": "smollm2-135m/wikitext", "stage": "ppo", "artifact": "ppo-smollm2-135m-wikitext"}
    with pytest.raises(ConfigError, match="cells: 'gpt2/x' is not in the registry"):
        build_catalog(parse_args({"registry": str(root), "cells": ["gpt2/x"]}))
    with pytest.raises(ConfigError, match="no registry.json"):
        build_catalog(parse_args({"registry": str(tmp_path / "elsewhere")}))


def test_a_moved_experiment_still_serves_from_its_registry_and_never_leaves_it(tmp_path):
    import shutil

    root = write_experiment(tmp_path / "before")
    moved = tmp_path / "after"
    shutil.move(root, moved)
    catalog = build_catalog(parse_args({"registry": str(moved)}))
    assert len(catalog) == 6
    for model in catalog.values():
        assert model.uri.startswith(f"{moved}/artifacts/{model.cell}/{model.stage}/"), model.uri
        assert json.loads((Path(model.stage_uri) / "config.json").read_text()) == {"made": model.model_id}

    path = moved / "report" / "registry.json"
    registry = json.loads(path.read_text())
    entry = registry["cells"]["pythia-70m/tinystories"]["ppo"]
    for fingerprint, message in (("../../../../etc", "ppo: not a stage in"),
                                 ("feedfacefeedface", "ppo: no committed ppo stage")):
        entry["fingerprint"] = fingerprint
        path.write_text(json.dumps(registry))
        with pytest.raises(ConfigError, match=message):
            build_catalog(parse_args({"registry": str(moved)}))


def test_a_replica_loads_only_the_weights_its_stage_committed(tmp_path):
    from slmrl_ray.serving.runners import local_folder
    from slmrl_ray.storage import ArtifactError

    root = write_experiment(tmp_path)
    catalog = build_catalog(parse_args({"registry": str(root)}))
    ppo = catalog["ppo/pythia-70m/tinystories"]
    assert ppo.files is not None and set(ppo.files) == {"model.safetensors"}
    assert local_folder(ppo.uri, ppo.files) == Path(ppo.uri)
    (Path(ppo.uri) / "model.safetensors").write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(ArtifactError, match="model.safetensors does not match its commit"):
        local_folder(ppo.uri, ppo.files)
    (Path(ppo.uri) / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        local_folder(ppo.uri, ppo.files)


def test_serve_command_reads_a_serve_config_or_a_registry(tmp_path):
    args, http = read_source(str(SERVE_CONFIGS[[p.stem for p in SERVE_CONFIGS].index("tiny")]))
    assert http == {"host": "127.0.0.1", "port": 8000} and args["stages"] == ["sft", "ppo"]
    assert read_source(str(tmp_path)) == ({"registry": str(tmp_path)}, {})


def test_serving_beyond_loopback_needs_an_api_key_unless_told_insecure(monkeypatch, capsys):
    from slmrl_ray.cli import main
    from slmrl_ray.serving.launch import is_loopback, start

    monkeypatch.delenv("SLMRL_RAY_API_KEY", raising=False)
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "10.0.0.5", "::", "example.org")))
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0 without an API key"):
        start("some-experiment", host="0.0.0.0")  # refused before Ray or any model starts
    assert main(["serve", "some-experiment", "--host", "10.0.0.5"]) != 0
    assert "--insecure to serve every model to anyone" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="api_key: must not be empty"):
        parse_args({"registry": "x", "api_key": " "})


def test_a_stale_cached_copy_of_a_remote_artifact_is_downloaded_again(tmp_path, monkeypatch):
    """A remote artifact's local copy that no longer matches its commit is fetched anew (this path
    once raised NameError: `shutil` was never imported; `ruff check` now guards undefined names)."""
    import pyarrow.fs as pafs

    from slmrl_ray.serving.runners import local_folder
    from slmrl_ray.storage import Storage, file_digests

    source = tmp_path / "bucket" / "model"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"committed weights")
    files = file_digests(source)
    remote = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())  # not local: cached
    monkeypatch.setattr(Storage, "from_uri", classmethod(lambda cls, uri: cls(uri, remote, "model")))
    monkeypatch.setenv("SLMRL_RAY_SERVE_CACHE", str(tmp_path / "cache"))
    cached = local_folder("s3://bucket/model", files)
    assert cached.is_relative_to(tmp_path / "cache")
    (cached / "model.safetensors").write_bytes(b"changed on disk")
    again = local_folder("s3://bucket/model", files)
    assert again == cached and (again / "model.safetensors").read_bytes() == b"committed weights"
