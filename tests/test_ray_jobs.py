"""The README's Ray jobs path: `ray start --head` on 127.0.0.1, then `ray job submit` a tiny grid.

This starts a second, separate Ray cluster (its own ports and temp folder) with the `ray`
command line, exactly as a user would, and stops only that cluster afterwards (`ray stop`
would also stop the test session's cluster).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_cluster(temp_dir: str) -> None:
    """Terminate the processes of the cluster whose temp folder is `temp_dir`."""
    mine = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or ()):
            mine.append(process)
    for process in mine:
        process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=10)
    for process in alive:
        process.kill()


def test_ray_job_submit_runs_a_tiny_grid(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    ray = shutil.which("ray", path=env["PATH"])
    start = subprocess.run(
        [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--object-store-memory=150000000"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        entrypoint = ["slmrl-ray", "grid", "tune_configs/tiny_grid.yaml", f"storage_path={tmp_path}",
                      "cells=[pythia-70m/tinystories]",
                      # What is tested is the job path, not learning: short budgets.
                      "pipeline.overrides=[sft.max_steps=8, reward.max_steps=8, ppo.steps=4, "
                      "ppo.checkpoint_every=2, eval.num_prompts=8, eval.num_bootstrap=1000]"]
        for _ in range(30):  # the job server comes up a moment after `ray start` returns
            listing = subprocess.run([ray, "job", "list", "--address", address], env=env,
                                     capture_output=True, text=True, timeout=60)
            if listing.returncode == 0:
                break
            time.sleep(2)
        for _ in range(15):  # the job agent can come up after the job server: Ray says to try again
            submitted = subprocess.run(
                [ray, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entrypoint],
                env=env, capture_output=True, text=True, timeout=600,
            )
            if "No available agent to submit job" not in submitted.stderr:
                break
            time.sleep(2)
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
        assert "| pythia-70m | tinystories |" in submitted.stdout  # the results table, from the job's logs
        assert "succeeded" in submitted.stdout.lower()
        listing = subprocess.run([ray, "job", "list", "--address", address], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert "SUCCEEDED" in listing.stdout
        assert (tmp_path / "tiny-grid" / "report" / "registry.json").is_file()
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
