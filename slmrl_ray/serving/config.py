"""Serve application arguments and the model catalog they resolve to (no Ray needed).

The `args` of a Serve config's application (`serve_configs/*.yaml`) are validated here
as strictly as every other config (unknown key or wrong type: a `ConfigError` naming its
dotted path). They name where the models come from, either the `registry.json` that a
grid or search wrote (a path or URI, or the experiment folder holding `report/`) or
explicit artifact folders, and which cells and stages to serve, with limits and
deployment sizes.

The catalog maps model ids (`ppo/pythia-70m/tinystories`, `sft/...`, `reward/...`) to
artifact URIs. Requests name model ids only. A request field is never turned into a
path: an id missing from the catalog is a 404.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slmrl_ray.config import ConfigError, build_dataclass

POLICY_STAGES = ("sft", "ppo")


@dataclass(frozen=True)
class ArtifactEntry:
    """One model given explicitly: a stage folder (holding `model/`) of one cell."""

    cell: str  # "model/corpus"
    stage: Literal["sft", "ppo", "reward"]
    uri: str  # the stage folder: a path or URI (its `model/` holds the weights)


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 512  # longer prompts are a 400 (never silently cut)
    max_tokens: int = 256  # cap on a request's max_tokens
    max_n: int = 8  # cap on n (completions, best-of-n)
    max_reward_pairs: int = 64  # pairs per /v1/rewards request
    max_body_bytes: int = 65_536
    request_timeout_s: float = 60.0  # longer requests are stopped: a 504 that says not to retry


@dataclass(frozen=True)
class Sizing:
    """Ray resources and concurrency of one deployment."""

    num_replicas: int = 1
    num_cpus: float = 0.25  # fractional: on a small machine whole CPUs per replica never fit
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32  # large enough for the batches to fill
    max_queued_requests: int = 64  # beyond this, requests get a 503 (overload, not an error)


@dataclass(frozen=True)
class PolicySizing(Sizing):
    max_models_per_replica: int = 4  # LRU of loaded policies per replica (Serve multiplexing)
    max_batch_size: int = 8  # concurrent requests (same policy and settings) per generate call
    batch_wait_timeout_s: float = 0.01


@dataclass(frozen=True)
class RewardSizing(Sizing):
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_models_per_replica: int = 4


@dataclass(frozen=True)
class ServeFaults:
    """Rehearsal knobs (tests, load drills); all off by default."""

    token_delay_s: float = 0.0  # a sleep per decoding step: generation as slow as a large model's


@dataclass(frozen=True)
class ServeArgs:
    registry: str | None = None  # registry.json, or an experiment folder (its report/registry.json)
    artifacts: tuple[ArtifactEntry, ...] = ()  # instead of a registry
    cells: tuple[str, ...] = ()  # empty: every cell of the registry
    stages: tuple[Literal["sft", "ppo"], ...] = POLICY_STAGES  # policies to serve
    device: str = "auto"
    limits: Limits = field(default_factory=Limits)
    policy: PolicySizing = field(default_factory=PolicySizing)
    reward: RewardSizing = field(default_factory=RewardSizing)
    # The ingress admits max_ongoing + max_queued requests per replica and refuses the rest with a
    # JSON 503 itself (Serve's proxy would answer text/plain): Serve gets twice that, and no queue cap.
    ingress: Sizing = field(default_factory=lambda: Sizing(max_ongoing_requests=128, max_queued_requests=256))
    # Every route but /health then needs `Authorization: Bearer <key>`. Prefer the environment
    # ($SLMRL_RAY_API_KEY where the app is built): args show in Serve's dashboard; only the key's
    # sha256 reaches the replicas.
    api_key: str | None = None
    faults: ServeFaults = field(default_factory=ServeFaults)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key: must not be empty")
        if (self.registry is None) == (not self.artifacts):
            raise ConfigError("give exactly one of `registry` and `artifacts`")


@dataclass(frozen=True)
class ServedModel:
    model_id: str  # "<stage>/<model>/<corpus>"
    stage: str
    cell: str
    uri: str  # the weights folder
    stage_uri: str  # its stage folder (config.json: the pipeline config that made it)
    fingerprint: str  # the artifact's hash: which configs produced it
    created: int = 0  # when its weights were written (unix seconds; 0 when the store does not say)
    max_model_len: int | None = None  # the model's context length (its config.json), when it says
    # The weights folder's files as its stage's commit lists them (relative path -> size and
    # sha256): a replica checks what it loads against them. None: not from a commit (`artifacts`).
    files: dict[str, dict] | None = None

    @property
    def provenance(self) -> dict:
        return {"cell": self.cell, "stage": self.stage, "artifact": self.fingerprint}


def parse_args(args: dict) -> ServeArgs:
    return build_dataclass(ServeArgs, args)


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "seq_length")


def _model(stage: str, cell: str, stage_uri: str, fingerprint: str, commit: dict | None = None) -> ServedModel:
    """The served model of a stage folder, with its weights' time and context length (OpenAI's
    `created`, vLLM's `max_model_len`) read from its `model/config.json`, and, from a commit,
    the digests its weights must match."""
    from slmrl_ray.storage import Storage, join_uri

    weights = join_uri(stage_uri, "model")
    config = Storage.from_uri(weights).child("config.json")
    created, context = 0, None
    info = config.filesystem.get_file_info(config.path)
    if info.is_file:
        created = int(info.mtime.timestamp()) if info.mtime is not None else 0
        settings = config.read_json()
        context = next((settings[k] for k in _CONTEXT_KEYS if isinstance(settings.get(k), int)), None)
    files = None if commit is None else {name[len("model/"):]: digest for name, digest in commit["files"].items()
                                         if name.startswith("model/")}
    return ServedModel(f"{stage}/{cell}", stage, cell, weights, stage_uri, fingerprint, created, context, files)


def _registry(uri: str):
    """The registry and the `ArtifactStore` of the experiment it sits in (`<root>/report/registry.json`).

    Its stages are found by fingerprint under that experiment's artifacts, wherever the
    experiment is now (`resume` allows moving it); a URI written into a record or the
    registry is never followed.
    """
    from slmrl_ray.storage import ArtifactStore, Storage, artifacts_storage, parent_uri

    place = Storage.from_uri(uri)
    if not place.is_file():
        place = place.child("report", "registry.json")
    if not place.is_file():
        raise ConfigError(f"registry: no registry.json at {uri} (nor under its report/)")
    registry = place.read_json()
    if registry.get("version") != 2:
        raise ConfigError(f"registry: {place.uri} is version {registry.get('version')}; rebuild it with "
                          f"`slmrl-ray report <experiment>` (this version reads 2)")
    root = Storage.from_uri(parent_uri(parent_uri(place.uri)))
    manifest = root.child("experiment.json")
    if not manifest.is_file():
        raise ConfigError(f"registry: {place.uri} is not inside an experiment (no {manifest.uri})")
    custom = manifest.read_json()["tune_config"].get("artifacts_path")
    return registry, ArtifactStore(artifacts_storage(root, custom))


def build_catalog(args: ServeArgs) -> dict[str, ServedModel]:
    """Model id -> served model, for the policies of `args.stages` and each cell's reward model."""

    from slmrl_ray.storage import ArtifactError

    catalog: dict[str, ServedModel] = {}
    if args.registry is not None:
        registry, store = _registry(args.registry)
        cells = registry["cells"]
        unknown = [c for c in args.cells if c not in cells]
        if unknown:
            raise ConfigError(f"cells: {unknown[0]!r} is not in the registry (it has {sorted(cells)})")
        for cell in args.cells or sorted(cells):
            entry = cells[cell]
            for stage in (*args.stages, "reward"):
                fingerprint = entry[stage]["fingerprint"]
                try:
                    place, commit = store.committed_with_commit(entry["model"], entry["corpus"], stage, fingerprint)
                except ArtifactError as error:
                    raise ConfigError(f"registry: {cell} {stage}: {error}") from None
                catalog[f"{stage}/{cell}"] = _model(stage, cell, place.uri, fingerprint, commit)
    else:
        for item in args.artifacts:
            if args.cells and item.cell not in args.cells:
                continue
            if item.stage != "reward" and item.stage not in args.stages:
                continue
            catalog[f"{item.stage}/{item.cell}"] = _model(item.stage, item.cell, item.uri, _fingerprint(item.uri))
    if not any(m.stage != "reward" for m in catalog.values()):
        raise ConfigError("nothing to serve: no policy matches `cells` and `stages`")
    return catalog


def _fingerprint(stage_uri: str) -> str:
    """The fingerprint in a stage folder's stage.json (what produced it), or "unknown"."""
    from slmrl_ray.storage import Storage

    marker = Storage.from_uri(stage_uri).child("stage.json")
    return marker.read_json().get("fingerprint", "unknown") if marker.is_file() else "unknown"


def reward_for(catalog: dict[str, ServedModel], cell: str) -> ServedModel | None:
    return catalog.get(f"reward/{cell}")
