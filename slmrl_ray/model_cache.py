"""The local model cache: its folder and the atomic save of a model snapshot into it.

The tiny preset's models (`tiny`), converted GGUF files (`gguf_source`) and the benchmark's
full-size random models (`bench.shapes`) are built once, saved like hub snapshots here, and
loaded back through `slmrl_ray.models` like any hub model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def default_cache_dir() -> Path:
    return Path(os.environ.get("SLMRL_RAY_CACHE", Path.home() / ".cache" / "slmrl_ray"))


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on building `target` (an advisory `flock` on a file beside it).

    Two trials that start together on one machine (a grid runs a model's cells side by side)
    would otherwise both build the same entry; the second now waits for the first and loads
    what it saved. The kernel drops the lock when its holder dies, so a crash never leaves it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_snapshot(model, tokenizer, target: Path) -> None:
    """Save like a hub snapshot into a scratch folder, then rename it to `target`: a crash
    never leaves a half-written cache entry, and a process losing the race keeps the winner's."""
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        os.replace(scratch, target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not (target / "model.safetensors").exists():  # not another process winning the race
            raise
