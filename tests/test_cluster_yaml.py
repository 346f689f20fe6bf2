"""`cluster.yaml` (the AWS cluster-launcher config) checked offline, without `ray.init`.

Validation is Ray's own, the first two steps of `ray up`
(`ray.autoscaler._private.commands._bootstrap_config`):

- `prepare_config` merges the provider's `defaults.yaml` shipped inside Ray (a file
  read, no network), prepends `setup_commands` to the head/worker setup commands and
  fills per-node-type min/max workers;
- `validate_config` checks the result against Ray's `ray-schema.json` (jsonschema) and
  the cross-field rules (head type exists, min workers fit under max_workers).

The steps `ray up` runs after those are the ones that talk to AWS through boto3:
`fillout_available_node_types_resources` (describe-instance-types) and
`bootstrap_config` (IAM profile, key pair, subnets, security groups). They are never
called here, so the test needs neither credentials nor a network.

Then the properties that matter for this project are asserted on the prepared config.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
N_CONFIGURATIONS = 15  # 5 models x 3 corpora, one one-GPU trial each


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _gpu_worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"] and t["resources"].get("GPU", 0) > 0}


def _ray_start_commands(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def _env_file_command(config: dict) -> str:
    [command] = [c for c in config["setup_commands"] if "~/.slmrl-ray.env" in c and "printf" in c]
    return command


def _project_checks(config: dict) -> None:
    """The project's rules on top of Ray's schema (used by the negative test too)."""
    types = config["available_node_types"]
    for name, node_type in types.items():
        for resource, amount in node_type["resources"].items():
            if isinstance(amount, bool) or not isinstance(amount, int):
                raise ValueError(f"{name}: resource {resource}={amount!r} is not a whole number")
    head = types[config["head_node_type"]]
    if head["resources"].get("CPU") != 0 or head["resources"].get("GPU", 0) != 0:
        raise ValueError("the head must offer CPU 0 and no GPU so that no trial lands there")
    if sum(t["max_workers"] * t["resources"]["GPU"] for t in _gpu_worker_types(config).values()) < N_CONFIGURATIONS:
        raise ValueError("the GPU worker types cannot hold 15 one-GPU trials")


# --- Ray's own validation -----------------------------------------------------------


def test_validates_with_rays_schema(prepared):
    # `prepared` ran prepare_config + validate_config; check what prepare_config filled.
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    _project_checks(prepared)


def test_no_default_commands_are_merged_in(raw):
    # prepare_config starts from Ray's aws/defaults.yaml and overlays our top-level keys:
    # a key we left out would come from the defaults (whose setup_commands install a
    # Ray nightly wheel, and whose head start command binds the dashboard to 0.0.0.0).
    import ray.autoscaler.aws

    defaults = yaml.safe_load((Path(ray.autoscaler.aws.__file__).parent / "defaults.yaml").read_text())
    missing = sorted(set(defaults) - set(raw))
    assert not missing, f"cluster.yaml leaves these to Ray's defaults: {missing}"


def test_header_says_how_to_use_it():
    header = []
    for line in CLUSTER_YAML.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    for command in ("ray get-auth-token --generate", "ray up cluster.yaml", "ray dashboard cluster.yaml",
                    "ray job submit --address http://127.0.0.1:8265", "ray down cluster.yaml"):
        assert command in text, command
    for what in ("region", "bucket", "IamInstanceProfile", "key", "InstanceType"):
        assert what in text, what


# --- what matters for this project -----------------------------------------------------


def test_dashboard_only_on_localhost(prepared):
    [head_start] = _ray_start_commands(prepared["head_start_ray_commands"])
    assert "--head" in head_start and "--port=6379" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


def test_token_auth_on_for_head_and_workers(prepared):
    # The switch Ray 2.60 actually reads, and the token file it loads by default.
    from ray._private.authentication.authentication_token_setup import (
        AUTH_MODE_ENV_VAR,
        _get_default_token_path,
    )

    assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = _ray_start_commands(prepared[key])
        switch = start.find(f"export {AUTH_MODE_ENV_VAR}=token;")
        assert 0 <= switch < start.find("ray start"), f"{key}: token auth is not on before `ray start`"
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()
    # Every node gets the launching machine's token at the path Ray loads by default.
    token_path = "~/" + _get_default_token_path().relative_to(Path.home()).as_posix()
    assert prepared["file_mounts"].get(token_path) == token_path
    # Interactive shells (`ray exec ... 'ray status'`, `ray attach`) are in token mode too.
    assert "'export RAY_AUTH_MODE=token'" in _env_file_command(prepared)


def test_workers_join_the_head(prepared):
    [start] = _ray_start_commands(prepared["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in start
    assert "--head" not in start


def test_gpu_workers_whole_gpus_and_head_runs_no_trial(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu_types = _gpu_worker_types(prepared)
    assert "gpu_1x" in gpu_types
    workers = [name for name in types if name != prepared["head_node_type"]]
    assert sorted(workers) == sorted(gpu_types), "every worker type must offer a GPU"
    for name, node_type in gpu_types.items():
        gpus = node_type["resources"]["GPU"]
        assert isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 1, name
        assert node_type["min_workers"] == 0, f"{name}: idle GPUs would bill with no trial"
        assert node_type["node_config"]["InstanceType"].startswith("g5."), name
    assert types["gpu_1x"]["resources"]["GPU"] == 1


def test_max_workers_cover_fifteen_one_gpu_trials(prepared):
    one_gpu = prepared["available_node_types"]["gpu_1x"]
    assert one_gpu["max_workers"] * one_gpu["resources"]["GPU"] >= N_CONFIGURATIONS
    assert prepared["max_workers"] >= one_gpu["max_workers"], "the global cap would stop gpu_1x short"
    assert prepared["max_workers"] == sum(
        t["max_workers"] for name, t in prepared["available_node_types"].items()
        if name != prepared["head_node_type"])
    assert prepared["idle_timeout_minutes"] > 0 and prepared["upscaling_speed"] > 0


def test_setup_installs_torch_before_the_project(prepared):
    assert prepared["file_mounts"]["~/slmrl-ray"] == "."
    for key in ("head_setup_commands", "worker_setup_commands"):  # after prepare_config's merge
        commands = prepared[key]
        torch = [i for i, c in enumerate(commands) if "pip install torch==2.13.0" in c]
        project = [i for i, c in enumerate(commands) if re.search(r"pip install (-c \S+ )?-e ~/slmrl-ray", c)]
        ray_pin = [i for i, c in enumerate(commands) if re.search(r"pip install .*\"ray\[[^]]*\]==2\.60\.0\"", c)]
        assert torch and project and ray_pin, key
        assert torch[0] < project[0] and ray_pin[0] < project[0], key
    assert any("boto3" in c for c in prepared["head_setup_commands"])


def test_every_pip_install_but_torch_goes_through_the_constraints_file(prepared):
    constraints = CLUSTER_YAML.parent / "cluster" / "constraints.txt"
    pins = dict(line.split("==") for line in constraints.read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["ray"] == "2.60.0" and "torch" not in pins
    import tomllib

    declared = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in declared:  # every direct dependency of the project is pinned
        name = re.split(r"[<>=\[ ]", requirement)[0].lower().replace("_", "-")
        assert name == "torch" or name in {k.lower().replace("_", "-") for k in pins}, name
    for key in ("head_setup_commands", "worker_setup_commands"):
        for command in prepared[key]:
            if "pip install" in command and "pip install torch==" not in command:
                assert "-c ~/slmrl-ray/cluster/constraints.txt" in command, command


def test_storage_is_an_s3_bucket_placeholder(prepared):
    match = re.search(r"SLMRL_RAY_STORAGE_PATH=\"([^\"]+)\"", _env_file_command(prepared))
    assert match
    uri = urlparse(match.group(1))
    assert uri.scheme == "s3" and uri.netloc == "<your-bucket>" and uri.path == "/slmrl-ray"
    for node_type in _gpu_worker_types(prepared).values():  # workers write to the bucket
        assert "IamInstanceProfile" in node_type["node_config"]


def _policy(name: str) -> list[dict]:
    return json.loads((CLUSTER_YAML.parent / "cluster" / "iam" / name).read_text())["Statement"]


def test_the_head_may_pass_the_workers_role_and_s3_is_scoped_to_the_bucket(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]["node_config"]
    head_profile = head["IamInstanceProfile"]["Arn"]  # set: `ray up` makes no ray-autoscaler-v1
    assert head_profile.endswith(":instance-profile/slmrl-ray-head")
    worker_profiles = {t["node_config"]["IamInstanceProfile"]["Arn"] for t in _gpu_worker_types(prepared).values()}
    assert worker_profiles == {"arn:aws:iam::<your-account-id>:instance-profile/slmrl-ray-worker"}
    head_policy = _policy("head-policy.json")
    passes = [s for s in head_policy if "iam:PassRole" in s["Action"]]
    assert passes and "arn:aws:iam::<your-account-id>:role/slmrl-ray-worker" in passes[0]["Resource"]
    assert any("ec2:RunInstances" in s["Action"] for s in head_policy)
    for statements in (head_policy, _policy("worker-policy.json")):
        s3 = [s for s in statements if any(a.startswith("s3:") for a in s["Action"])]
        assert s3 and all(s["Resource"] in ("arn:aws:s3:::<your-bucket>", "arn:aws:s3:::<your-bucket>/slmrl-ray/*")
                          for s in s3)
        assert all(a != "*" and not a.endswith(":*") for s in statements for a in s["Action"])


def test_the_readme_lists_every_place_a_user_must_edit():
    readme = (CLUSTER_YAML.parent / "README.md").read_text()
    section = readme[readme.index("## A cluster on AWS"):]
    texts = [CLUSTER_YAML.read_text()] + [p.read_text() for p in (CLUSTER_YAML.parent / "cluster" / "iam").glob("*.json")]
    placeholders = {m for text in texts for m in re.findall(r"<your-[a-z-]+>", text)}
    assert placeholders >= {"<your-bucket>", "<your-account-id>"}
    for placeholder in placeholders:
        assert placeholder in section, placeholder
    for name in ("head-policy.json", "worker-policy.json", "ec2-trust.json", "iam:PassRole", "region"):
        assert name in section, name


def test_env_file_command_runs_and_sources_cleanly(prepared, tmp_path):
    # The setup command that writes ~/.slmrl-ray.env, run by bash in a scratch HOME; the
    # file must then source without errors (an unquoted `<your-bucket>` would be read as
    # a redirection) and export what the nodes rely on.
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    subprocess.run(["bash", "-c", _env_file_command(prepared)], env=env, check=True, timeout=30)
    shown = subprocess.run(
        ["bash", "-c", ". ~/.slmrl-ray.env && echo \"$RAY_AUTH_MODE|$SLMRL_RAY_STORAGE_PATH\""],
        env=env, check=True, capture_output=True, text=True, timeout=30)
    assert shown.stderr == ""
    assert shown.stdout.strip() == "token|s3://<your-bucket>/slmrl-ray"


# --- the validation can fail -------------------------------------------------------------


@pytest.mark.parametrize("break_it", ["misspelled_top_level_key", "fractional_node_gpu"])
def test_rays_validation_rejects_a_broken_config(raw, break_it):
    broken = copy.deepcopy(raw)
    if break_it == "misspelled_top_level_key":
        broken["max_worker"] = broken.pop("max_workers")
        reason = r"Additional properties are not allowed \('max_worker' was unexpected\)"
    else:
        broken["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5
        reason = r"0\.5 is not of type 'integer'"
    with pytest.raises(jsonschema.ValidationError, match=reason):
        validate_config(prepare_config(broken))


def test_project_checks_reject_a_head_that_would_run_trials(raw):
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["head"]["resources"] = {"CPU": 8}
    config = prepare_config(broken)
    validate_config(config)  # valid for Ray, wrong for us
    with pytest.raises(ValueError, match="head must offer CPU 0"):
        _project_checks(config)
