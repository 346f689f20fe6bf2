"""Experiment storage: one URI scheme for a local folder, a shared (NFS) path or a bucket.

`Storage` wraps a pyarrow filesystem and a path inside it, made from what a user writes
in a tune config or on the command line: `/mnt/nfs/exp`, `runs/exp` (made absolute),
`file:///...`, `s3://bucket/exp`, `gs://bucket/exp`, or an S3-compatible server with
`s3://bucket/exp?endpoint_override=127.0.0.1:9000&scheme=http`. Ray Tune gets the same
filesystem and path, so trial checkpoints and our stage artifacts live side by side.

`ArtifactStore` keeps finished stage folders under
`<artifacts>/<model>/<corpus>/<stage>/<fingerprint>/`, keyed by the chained fingerprint
of the configs that produced them (`slmrl_ray.artifacts`): any trial, on any node, that
needs a stage with the same fingerprint fetches it instead of running it. That is how a
search runs SFT and the reward model once per cell, and how a retried trial never repeats
a finished stage. Each stage execution also leaves a small record under `_executions/`,
so what ran where (and how often) can be counted afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from slmrl_ray.artifacts import RunPaths, stage_fingerprints
from slmrl_ray.config import PipelineConfig

# PPO checkpoints travel as Tune checkpoints; the published stage keeps only the result.
UNPUBLISHED = ("checkpoints",)
MARKER = "stage.json"  # written last locally, uploaded last: its presence means "complete"


def join_uri(uri: str, *parts: str) -> str:
    """Append path parts to a URI or a path, keeping any query string (`?endpoint_override=...`)."""
    scheme, netloc, path, query, fragment = urlsplit(uri)
    if not scheme or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        return str(Path(uri, *parts))
    path = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((scheme, netloc, path, query, fragment))


def parent_uri(uri: str) -> str:
    """The URI or path one level up, keeping any query string."""
    base, mark, query = uri.partition("?")
    return base.rstrip("/").rsplit("/", 1)[0] + mark + query


def normalize_uri(uri: str) -> str:
    """Local paths become absolute (`~` expanded); URIs stay as they are."""
    scheme = urlsplit(uri).scheme
    if scheme and len(scheme) > 1:
        return uri
    return str(Path(uri).expanduser().resolve())


@dataclass(frozen=True)
class Storage:
    """A location: `uri` as users write it, and the pyarrow `filesystem` + `path` it means."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @classmethod
    def from_uri(cls, uri: str) -> "Storage":
        uri = normalize_uri(str(uri))
        try:
            filesystem, path = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as error:
            raise ValueError(f"cannot open storage {uri!r}: {error}") from None
        return cls(uri, filesystem, path.rstrip("/") or "/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def child(self, *parts: str) -> "Storage":
        return Storage(join_uri(self.uri, *parts), self.filesystem, "/".join([self.path, *parts]))

    def _info(self, path: str) -> pafs.FileInfo:
        return self.filesystem.get_file_info(path)

    def exists(self) -> bool:
        return self._info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info(self.path).type == pafs.FileType.File

    def read_text(self) -> str:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read().decode()

    def read_json(self):
        return json.loads(self.read_text())

    def write_text(self, text: str) -> None:
        """Write a file; object stores make a put atomic, local files go through a rename."""
        parent = self.path.rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        if self.is_local:
            scratch = Path(parent) / f".{Path(self.path).name}.{uuid.uuid4().hex[:8]}.tmp"
            scratch.write_text(text)
            os.replace(scratch, self.path)
            return
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(text.encode())

    def write_json(self, payload) -> None:
        self.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=True))

    def list(self) -> list[str]:
        """Names directly under this location (empty when it does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector))

    def upload(self, local: Path, exclude: tuple[str, ...] = (), last: tuple[str, ...] = ()) -> None:
        """Copy a local folder here; files named in `last` go after everything else."""
        local = Path(local)
        files = [
            f for f in sorted(local.rglob("*"))
            if f.is_file() and not set(f.relative_to(local).parts) & set(exclude)
        ]
        files.sort(key=lambda f: f.name in last)  # stable: keeps the order otherwise
        source = pafs.LocalFileSystem()
        for file in files:
            relative = file.relative_to(local).as_posix()
            target = f"{self.path}/{relative}"
            self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(file), target, source_filesystem=source, destination_filesystem=self.filesystem)

    def download(self, local: Path) -> None:
        """Copy this folder into `local` (replacing it), through a scratch folder and a rename."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=local.parent, prefix=f".{local.name}-"))
        try:
            pafs.copy_files(self.path, str(scratch), source_filesystem=self.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
            shutil.rmtree(local, ignore_errors=True)
            os.replace(scratch, local)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def artifacts_storage(root: Storage, artifacts_path: str | None) -> Storage:
    """Where an experiment at `root` keeps its finished stages: `artifacts_path` (a tune config's,
    to share them between experiments) or `<root>/artifacts`."""
    return Storage.from_uri(artifacts_path) if artifacts_path else root.child("artifacts")


class ArtifactStore:
    """Finished stage folders in storage, keyed by fingerprint; see the module docstring."""

    def __init__(self, root: Storage, who: str = "", node: str | None = None) -> None:
        self.root = root
        self.who = who  # recorded with each execution (a trial id)
        self.node = node or socket.gethostname()  # and where it ran (a Tune trial passes its Ray node)

    def stage_location(self, config: PipelineConfig, stage: str) -> Storage:
        return self.root.child(config.model, config.corpus, stage, stage_fingerprints(config)[stage])

    def has(self, config: PipelineConfig, stage: str) -> bool:
        marker = self.stage_location(config, stage).child(MARKER)
        return marker.is_file() and marker.read_json().get("fingerprint") == stage_fingerprints(config)[stage]

    def fetch(self, paths: RunPaths, stage: str, config: PipelineConfig) -> bool:
        if not self.has(config, stage):
            return False
        self.stage_location(config, stage).download(paths.stage(stage))
        return True

    def started(self, stage: str, config: PipelineConfig) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        name = f"{stage}-{stage_fingerprints(config)[stage]}-{stamp}-{uuid.uuid4().hex[:8]}.json"
        self.root.child("_executions", config.model, config.corpus, name).write_json({
            "model": config.model,
            "corpus": config.corpus,
            "stage": stage,
            "fingerprint": stage_fingerprints(config)[stage],
            "trial_id": self.who,
            "node": self.node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
        })

    def publish(self, paths: RunPaths, stage: str, config: PipelineConfig) -> None:
        self.stage_location(config, stage).upload(paths.stage(stage), exclude=UNPUBLISHED, last=(MARKER,))

    def executions(self) -> list[dict]:
        """Every recorded stage execution, across cells."""
        records = []
        folder = self.root.child("_executions")
        for model in folder.list():
            for corpus in folder.child(model).list():
                for name in folder.child(model, corpus).list():
                    records.append(folder.child(model, corpus, name).read_json())
        return sorted(records, key=lambda r: r["started_at"])

