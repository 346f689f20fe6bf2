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

Publishing is a commit, safe against any number of writers:

    <fingerprint>/attempts/<attempt>/   one writer's upload, never shared with another
    <fingerprint>/stage.json            the commit: which attempt, and every file's size and sha256

A writer uploads into its own attempt folder and then creates `stage.json` exclusively
(`O_EXCL`-style: a hard link locally, `If-None-Match: *` on S3). The first writer wins; a
later one deletes its attempt and takes the winner's. A writer killed midway leaves an
attempt without a commit, which nothing reads. A fetch checks every file against the commit.
"""

from __future__ import annotations

import hashlib
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
MARKER = "stage.json"  # a stage folder's marker; in storage, the commit naming the attempt
ATTEMPTS = "attempts"


class ArtifactError(RuntimeError):
    """A committed stage whose files do not match its commit, or a path that leaves the store."""


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

    def create_exclusive(self, text: str) -> bool:
        """Create this file with `text` only if it does not exist yet; False when it did.

        Atomic against every other writer: locally a hard link of a finished scratch
        file (fails on an existing name, so a reader never sees a half-written file),
        on S3 a conditional put (`If-None-Match: *`). Other object stores have no
        portable precondition in pyarrow: there it is check-then-write.
        """
        parent = self.path.rsplit("/", 1)[0]
        self.filesystem.create_dir(parent, recursive=True)
        if self.is_local:
            scratch = Path(parent) / f".{Path(self.path).name}.{uuid.uuid4().hex[:8]}.tmp"
            scratch.write_text(text)
            try:
                os.link(scratch, self.path)
                return True
            except FileExistsError:
                return False
            finally:
                scratch.unlink()
        if self.filesystem.type_name == "s3":
            return _s3_put_if_absent(self, text.encode())
        if self.exists():
            return False
        self.write_text(text)
        return True

    def delete(self) -> None:
        """Remove this file or folder (nothing happens when it is absent)."""
        info = self._info(self.path)
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(self.path)

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


def _s3_put_if_absent(place: Storage, body: bytes) -> bool:
    """S3's conditional put (pyarrow has none): boto3 with the URI's endpoint, scheme and region."""
    import boto3
    from botocore.exceptions import ClientError
    from urllib.parse import parse_qs

    query = {k: v[-1] for k, v in parse_qs(urlsplit(place.uri).query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region"))
    bucket, _, key = place.path.partition("/")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        return True
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise


def file_digests(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Relative path -> size and sha256 of every file under `folder`."""
    folder = Path(folder)
    digests = {}
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if not file.is_file() or set(relative.parts) & set(exclude):
            continue
        sha = hashlib.sha256()
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                sha.update(block)
        digests[relative.as_posix()] = {"size": file.stat().st_size, "sha256": sha.hexdigest()}
    return digests


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
        """The stage's fingerprint folder (its commit and its attempts)."""
        return self.location(config.model, config.corpus, stage, stage_fingerprints(config)[stage])

    def location(self, model: str, corpus: str, stage: str, fingerprint: str) -> Storage:
        parts = (model, corpus, stage, fingerprint)
        if any(not part or part in (".", "..") or "/" in part or "\\" in part or "?" in part for part in parts):
            raise ArtifactError(f"not a stage in {self.root.uri}: {'/'.join(parts)!r}")
        return self.root.child(*parts)

    def commit(self, config: PipelineConfig, stage: str) -> dict | None:
        """The stage's commit (see the module docstring), or None while none is made."""
        return self._commit(self.stage_location(config, stage), stage_fingerprints(config)[stage])

    def _commit(self, place: Storage, fingerprint: str) -> dict | None:
        marker = place.child(MARKER)
        if not marker.is_file():
            return None
        commit = marker.read_json()
        if commit.get("fingerprint") != fingerprint or not isinstance(commit.get("attempt"), str):
            raise ArtifactError(f"{marker.uri} is not a commit of fingerprint {fingerprint}")
        return commit

    def has(self, config: PipelineConfig, stage: str) -> bool:
        return self.commit(config, stage) is not None

    def committed(self, model: str, corpus: str, stage: str, fingerprint: str) -> Storage:
        """The folder holding a committed stage's files; an `ArtifactError` when there is none."""
        return self.committed_with_commit(model, corpus, stage, fingerprint)[0]

    def committed_with_commit(self, model: str, corpus: str, stage: str, fingerprint: str) -> tuple[Storage, dict]:
        """`committed`, and the commit itself (its `files`: what the folder must hold)."""
        place = self.location(model, corpus, stage, fingerprint)
        commit = self._commit(place, fingerprint)
        if commit is None:
            raise ArtifactError(f"no committed {stage} stage at {place.uri}")
        attempt = commit["attempt"]
        if not attempt.replace("-", "").isalnum():
            raise ArtifactError(f"{place.child(MARKER).uri} names an attempt outside its folder: {attempt!r}")
        return place.child(ATTEMPTS, attempt), commit

    def fetch(self, paths: RunPaths, stage: str, config: PipelineConfig) -> bool:
        """Download the committed stage into `paths` and check it file by file; False when none."""
        if not self.has(config, stage):
            return False
        self.fetch_folder(paths.stage(stage), config.model, config.corpus, stage, stage_fingerprints(config)[stage])
        return True

    def fetch_folder(self, local: Path, model: str, corpus: str, stage: str, fingerprint: str) -> None:
        """Download a committed stage into `local`, checked against its commit file by file."""
        source, commit = self.committed_with_commit(model, corpus, stage, fingerprint)
        source.download(local)
        verify(local, commit, source.uri)

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

    def publish(self, paths: RunPaths, stage: str, config: PipelineConfig) -> bool:
        """Upload a finished stage and commit it; False when another writer's commit was first.

        On False the stage in storage is the other writer's: `fetch` it to continue from
        what every other trial sees.
        """
        if self.has(config, stage):
            return False
        return self.publish_folder(paths.stage(stage), config.model, config.corpus, stage,
                                   stage_fingerprints(config)[stage])

    def publish_folder(self, local: Path, model: str, corpus: str, stage: str, fingerprint: str) -> bool:
        """`publish` for a stage folder named by its place and fingerprint."""
        place = self.location(model, corpus, stage, fingerprint)
        attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        files = file_digests(local, exclude=UNPUBLISHED)
        place.child(ATTEMPTS, attempt).upload(local, exclude=UNPUBLISHED)
        commit = {
            "stage": stage,
            "fingerprint": fingerprint,
            "attempt": attempt,
            "files": files,
            "published_by": self.who,
            "node": self.node,
            "host": socket.gethostname(),
            "published_at": time.time(),
        }
        if place.child(MARKER).create_exclusive(json.dumps(commit, indent=2, sort_keys=True)):
            return True
        place.child(ATTEMPTS, attempt).delete()  # lost the race: the winner's files are the stage
        return False

    def executions(self) -> list[dict]:
        """Every recorded stage execution, across cells."""
        records = []
        folder = self.root.child("_executions")
        for model in folder.list():
            for corpus in folder.child(model).list():
                for name in folder.child(model, corpus).list():
                    records.append(folder.child(model, corpus, name).read_json())
        return sorted(records, key=lambda r: r["started_at"])



def verify(local: Path, commit: dict, source: str) -> None:
    """Every file a commit lists is in `local` with its size and sha256 (else `ArtifactError`)."""
    found = file_digests(local)
    for name, expected in commit["files"].items():
        if found.get(name) != expected:
            got = found.get(name)
            what = "missing" if got is None else f"{got['size']} bytes, sha256 {got['sha256'][:12]}"
            raise ArtifactError(f"{source}/{name} does not match its commit ({what}; the commit says "
                                f"{expected['size']} bytes, sha256 {expected['sha256'][:12]})")
