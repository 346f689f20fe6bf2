"""The artifact store and the driver lease against real concurrency: processes racing to publish
one fingerprint (on a local folder and on a moto S3 server), a publisher killed midway, a second
driver, an experiment moved after it ran. No Ray here."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slmrl_ray import artifacts
from slmrl_ray.artifacts import RunPaths, stage_fingerprints
from slmrl_ray.config import load_config
from slmrl_ray.lease import DriverLease, LeaseHeld
from slmrl_ray.storage import ArtifactError, ArtifactStore, Storage

REPO = Path(__file__).resolve().parents[1]
TINY_GRID = REPO / "tune_configs" / "tiny_grid.yaml"
PLACE = ("pythia-70m", "tinystories", "sft", "0123456789abcdef")


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> str:
    """An artifacts root on a local folder or in the moto bucket (a fresh prefix per test)."""
    if request.param == "local":
        return str(tmp_path / "artifacts")
    uri, _ = request.getfixturevalue("s3_bucket")
    base, _, query = uri.partition("?")
    return f"{base}/{tmp_path.name}/artifacts?{query}"


def stage_folder(folder: Path, tag: int, megabytes: int = 6) -> Path:
    """A stage folder whose weights differ by `tag` (so whose files are whose can be told)."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(bytes([tag]) * (megabytes << 20))
    (folder / "config.json").write_text(json.dumps({"writer": tag}))
    (folder / "stage.json").write_text(json.dumps({"stage": "sft", "fingerprint": PLACE[3]}))
    return folder


WRITER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from slmrl_ray.storage import ArtifactStore, Storage
    root, folder, go, kill_after = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    if kill_after:  # die (SIGKILL, no cleanup) once this many files are uploaded
        import pyarrow.fs as pafs, signal
        copy, done = pafs.copy_files, []
        def dying_copy(*args, **kwargs):
            if len(done) == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            copy(*args, **kwargs)
            done.append(args)
        pafs.copy_files = dying_copy
    while not go.exists():
        time.sleep(0.005)
    store = ArtifactStore(Storage.from_uri(root), who=folder.name)
    print(json.dumps(store.publish_folder(folder, *json.loads(sys.argv[5]))))
""")


def writer(root: str, folder: Path, go: Path, kill_after: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, root, str(folder), str(go), str(kill_after),
                             json.dumps(PLACE)], cwd=REPO, stdout=subprocess.PIPE, text=True)


def attempts(store: ArtifactStore) -> list[str]:
    return store.location(*PLACE).child("attempts").list()


def test_two_processes_publishing_one_fingerprint_leave_one_complete_verified_stage(store_root, tmp_path):
    go = tmp_path / "go"
    procs = [writer(store_root, stage_folder(tmp_path / f"writer{tag}", tag), go) for tag in (1, 2)]
    time.sleep(1.0)  # both imported and waiting
    go.touch()
    won = [json.loads(proc.communicate(timeout=120)[0]) for proc in procs]
    assert sorted(won) == [False, True]  # first writer wins, the other backs off
    store = ArtifactStore(Storage.from_uri(store_root))
    assert len(attempts(store)) == 1  # the loser removed its own upload
    store.fetch_folder(tmp_path / "fetched", *PLACE)  # checks every file against the commit
    winner = 1 if won[0] else 2
    assert json.loads((tmp_path / "fetched" / "config.json").read_text()) == {"writer": winner}
    weights = (tmp_path / "fetched" / "model" / "model.safetensors").read_bytes()
    assert len(weights) == 6 << 20 and set(weights) == {winner}  # whole, and one writer's only


def test_a_publish_killed_midway_is_never_fetched_and_the_next_writer_commits(store_root, tmp_path):
    go = tmp_path / "go"
    go.touch()
    killed = writer(store_root, stage_folder(tmp_path / "killed", 1), go, kill_after=1)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    store = ArtifactStore(Storage.from_uri(store_root))
    assert len(attempts(store)) == 1  # its partial upload is there...
    with pytest.raises(ArtifactError, match="no committed sft stage"):
        store.committed(*PLACE)  # ...and nothing reads it
    assert store.publish_folder(stage_folder(tmp_path / "second", 2), *PLACE)
    store.fetch_folder(tmp_path / "fetched", *PLACE)
    assert json.loads((tmp_path / "fetched" / "config.json").read_text()) == {"writer": 2}


def test_a_committed_file_changed_afterwards_fails_the_fetch(tmp_path):
    store = ArtifactStore(Storage.from_uri(str(tmp_path / "artifacts")))
    assert store.publish_folder(stage_folder(tmp_path / "stage", 3, megabytes=1), *PLACE)
    weights = Path(store.committed(*PLACE).path) / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 19])  # truncated behind the commit's back
    with pytest.raises(ArtifactError, match=r"model/model.safetensors does not match its commit \(524288 bytes"):
        store.fetch_folder(tmp_path / "fetched", *PLACE)


def test_a_commit_cannot_point_outside_its_fingerprint_folder(tmp_path):
    store = ArtifactStore(Storage.from_uri(str(tmp_path / "artifacts")))
    assert store.publish_folder(stage_folder(tmp_path / "stage", 4, megabytes=1), *PLACE)
    marker = Path(store.location(*PLACE).child("stage.json").path)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "attempt": "../../../../elsewhere"}))
    with pytest.raises(ArtifactError, match="names an attempt outside its folder"):
        store.committed(*PLACE)
    with pytest.raises(ArtifactError, match="not a stage in"):
        store.location("pythia-70m", "..", "sft", "x")


# ---------------------------------------------------------------- fingerprints


def test_changing_what_a_stage_depends_on_changes_its_fingerprint(tmp_path, monkeypatch):
    base = load_config(preset="tiny", overrides=[f"output_dir={tmp_path}"])
    more = dataclasses.replace(base, eval=dataclasses.replace(base.eval, num_prompts=base.eval.num_prompts + 1))
    assert stage_fingerprints(more)["data"] != stage_fingerprints(base)["data"]  # eval.jsonl changes
    before = stage_fingerprints(base)
    machine = artifacts.runtime(base.device)
    monkeypatch.setattr(artifacts, "runtime", lambda device: {**machine, "bf16": not machine["bf16"]})
    after = stage_fingerprints(base)  # `precision: auto` resolves to another dtype there
    assert after["data"] == before["data"] and after["sft"] != before["sft"] and after["ppo"] != before["ppo"]
    monkeypatch.setattr(artifacts, "runtime", lambda device: {**machine, "version": "99.0"})
    assert stage_fingerprints(base)["data"] != before["data"]


def test_changing_eval_num_prompts_reruns_the_data_stage(tmp_path):
    from slmrl_ray.data import EvalExample, load_jsonl
    from slmrl_ray.pipeline import run_pipeline
    log: list[str] = []
    for count in (6, 9):
        config = load_config(preset="tiny", overrides=[f"output_dir={tmp_path}", "model=pythia-70m",
                                                       "corpus=tinystories", f"eval.num_prompts={count}"])
        run_pipeline(config, ["data"], log=log.append)
        assert len(load_jsonl(RunPaths.for_config(config).data / "eval.jsonl", EvalExample)) == count
    assert sum("[data] running" in line for line in log) == 2


# ---------------------------------------------------------------- one driver per experiment


def test_a_second_driver_is_refused_while_the_first_holds_the_lease(tmp_path):
    from slmrl_ray.tuning.config import load_tune_config
    from slmrl_ray.tuning.experiment import experiment_root, write_manifest

    experiment = load_tune_config(TINY_GRID, [f"storage_path={tmp_path}", "name=held"])
    root = experiment_root(experiment)
    write_manifest(experiment, "grid", root)
    with DriverLease(root, ttl_s=30):
        with pytest.raises(LeaseHeld, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            DriverLease(root).acquire()
        second = subprocess.run([sys.executable, "-m", "slmrl_ray.cli", "resume", root.uri], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"being run by another driver (pid {os.getpid()}" in second.stderr, second.stderr[-2000:]
    assert root.child("driver.lease").list() == []  # released on exit
    DriverLease(root).acquire().release()


def test_a_lease_is_taken_over_once_its_holder_is_dead_or_silent(tmp_path):
    root = Storage.from_uri(str(tmp_path / "exp"))
    holder = subprocess.run([sys.executable, "-c", "import sys; from slmrl_ray.lease import DriverLease; "
                             "from slmrl_ray.storage import Storage; DriverLease(Storage.from_uri(sys.argv[1]), ttl_s=600).acquire()",
                             root.uri], cwd=REPO, timeout=120)
    assert holder.returncode == 0 and root.child("driver.lease").list() == ["000001"]  # died holding it
    DriverLease(root).acquire().release()  # a dead pid on this host: taken over at once

    lease = root.child("driver.lease", "000007")
    elsewhere = {"id": "x", "host": "another-node", "pid": 1, "what": "driver"}
    lease.write_json({**elsewhere, "expires_at": time.time() + 600})
    with pytest.raises(LeaseHeld, match="another-node"):
        DriverLease(root).acquire()  # alive elsewhere, as far as anyone here can tell
    lease.write_json({**elsewhere, "expires_at": time.time() - 1})
    DriverLease(root).acquire().release()  # it stopped renewing: expired


def test_a_held_lease_is_renewed(tmp_path):
    root = Storage.from_uri(str(tmp_path / "exp"))
    with DriverLease(root, ttl_s=0.6) as held:
        first = held.place.read_json()["expires_at"]
        time.sleep(1.0)
        assert held.place.read_json()["expires_at"] > first + 0.3
        with pytest.raises(LeaseHeld):
            DriverLease(root).acquire()


def test_of_two_drivers_taking_over_one_stale_lease_only_one_holds_it(store_root, monkeypatch):
    """A between A's look at the stale lease and its takeover: B takes it over first, and A
    must not then replace B's fresh lease with its own."""
    root = Storage.from_uri(store_root)
    silent = DriverLease(root, ttl_s=0.05).acquire()
    silent._stop.set()  # its holder hangs: no more renewals, so the lease expires
    silent._thread.join()
    time.sleep(0.1)
    first, second = DriverLease(root), DriverLease(root)
    judge, interleaved_once = DriverLease._stale, []

    def interleaved(lease, current):
        stale = judge(lease, current)
        if lease is first and not interleaved_once:
            interleaved_once.append(second.acquire())  # B, in the middle of A's takeover
        return stale

    monkeypatch.setattr(DriverLease, "_stale", interleaved)
    with pytest.raises(LeaseHeld, match="being run by another driver"):
        first.acquire()
    assert second.place.read_json()["id"] == second.holder["id"]  # B's lease stands
    second.release()


def test_a_lease_left_by_a_single_file_driver_is_still_honoured(tmp_path):
    root = Storage.from_uri(str(tmp_path / "exp"))
    legacy = root.child("driver.lease")
    legacy.write_json({"id": "x", "host": "another-node", "pid": 1, "expires_at": time.time() + 600})
    with pytest.raises(LeaseHeld, match="another-node"):
        DriverLease(root).acquire()
    legacy.write_json({"id": "x", "host": "another-node", "pid": 1, "expires_at": time.time() - 1})
    DriverLease(root).acquire().release()


def test_a_driver_whose_lease_was_taken_over_stops_at_once(tmp_path):
    """It stalled past its lease's expiry and another driver took the experiment over: it must
    not drive on beside the new one, nor write over the new lease."""
    root = Storage.from_uri(str(tmp_path / "exp"))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from slmrl_ray.lease import DriverLease; from slmrl_ray.storage import Storage; "
        "from slmrl_ray.tuning.experiment import stop_driver; "
        "DriverLease(Storage.from_uri(sys.argv[1]), ttl_s=0.6, on_lost=stop_driver).acquire(); time.sleep(60)"),
        root.uri], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while root.child("driver.lease").list() != ["000001"]:
            assert time.monotonic() < deadline and holder.poll() is None, "the holder never took its lease"
            time.sleep(0.05)
        newer = root.child("driver.lease", "000002")
        newer.write_json({"id": "new", "host": "another-node", "pid": 1, "expires_at": time.time() + 600})
        _, stderr = holder.communicate(timeout=20)
    finally:
        holder.kill()
    assert holder.returncode == 1 and "another driver took" in stderr and "this driver stops now" in stderr, stderr
    assert newer.read_json()["id"] == "new"
