"""Reward sources: a reward model, verifiable rules, or a weighted mix (the `rewards:` config).

PPO, GRPO/RLOO and evaluation all score responses through `build_reward`, so the
reward a policy is trained on is the reward it is evaluated on. `RuleSet` holds the
verifiable rules (exact match, regular expression, format, length; see
`config.RuleConfig`), each scored in [0, 1] from the prompt and the response text;
`MixedReward` adds `model_weight` x the reward model's score. `build_judge` loads the
evaluation's judge, which scores but never trains.

Which reward model: the pipeline's own (`reward/model`, scored in the pipeline's format
by `RewardScorer`), the judge trained on a disjoint split (`reward/judge`), or an
external one (`ExternalRewardScorer`, through its own tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from slmrl_ray.config import (
    RULE_FIELD,
    ExternalRewardModel,
    JudgeConfig,
    PipelineConfig,
    RewardModelConfig,
    RewardsConfig,
    RuleConfig,
)
from slmrl_ray.models import (
    load_external_reward_model,
    load_external_tokenizer,
    load_reward_model,
    load_tokenizer,
)
from slmrl_ray.scoring import ExternalRewardScorer, RewardScorer, Scorer

JUDGE_FOLDER = "judge"  # inside the reward stage folder, when the judge is trained on a split


def _fill(template: str, groups: dict[str, str], as_regex: bool) -> str:
    """`template` with `{group}` fields replaced by the prompt's captured text (escaped for a regex)."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in groups:
            raise KeyError(name)
        return re.escape(groups[name]) if as_regex else groups[name]

    return RULE_FIELD.sub(value, template)


def rule_score(rule: RuleConfig, prompt: str, response: str) -> float:
    """One rule's score in [0, 1] for one response (see `RuleConfig` for the kinds)."""
    groups: dict[str, str] = {}
    if rule.prompt_pattern is not None:
        found = re.search(rule.prompt_pattern, prompt)
        if found is None:
            return 0.0
        groups = {k: v for k, v in found.groupdict().items() if v is not None}
    text = response.strip()
    try:
        if rule.kind == "regex":
            return float(re.search(_fill(rule.pattern, groups, True), text) is not None)
        if rule.kind == "format":
            return float(re.fullmatch(_fill(rule.pattern, groups, True), text, flags=re.DOTALL) is not None)
        if rule.kind == "exact_match":
            answer = text
            if rule.pattern is not None:
                found = re.search(_fill(rule.pattern, groups, True), text)
                if found is None:
                    return 0.0
                answer = (found.group(1) if found.groups() else found.group(0)).strip()
            return float(answer == _fill(rule.answer, groups, False).strip())
    except KeyError:  # a field the prompt did not capture
        return 0.0
    words = len(text.split())  # length
    return max(0.0, 1.0 - abs(words - rule.target) / (rule.tolerance * rule.target))


def rule_names(rules: Sequence[RuleConfig]) -> list[str]:
    return [rule.name or f"{rule.kind}_{index}" for index, rule in enumerate(rules)]


class RuleSet:
    """Verifiable rules, weighted; `components` gives each rule's unweighted scores."""

    def __init__(self, rules: Sequence[RuleConfig]):
        self.rules = tuple(rules)
        self.names = rule_names(self.rules)

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        return {
            name: torch.tensor([rule_score(rule, p, r) for p, r in zip(prompts, responses)], dtype=torch.float32)
            for name, rule in zip(self.names, self.rules)
        }

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        total = torch.zeros(len(prompts))
        for rule, values in zip(self.rules, self.components(prompts, responses).values()):
            total += rule.weight * values
        return total


class MixedReward:
    """model_weight x reward model + weighted rules; `components` breaks the total down."""

    def __init__(self, model: Scorer | None, model_weight: float, rules: RuleSet):
        if model is None and model_weight != 0:
            raise ValueError("a reward-model weight without a reward model")
        self.model = model
        self.model_weight = model_weight
        self.rules = rules

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        parts = {} if self.model is None else {"model": self.model.score(prompts, responses)}
        return {**parts, **self.rules.components(prompts, responses)}

    def total(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        total = self.model_weight * components["model"] if self.model is not None else 0.0
        for rule, name in zip(self.rules.rules, self.rules.names):
            total = total + rule.weight * components[name]
        return torch.as_tensor(total, dtype=torch.float32)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.total(self.components(prompts, responses))


def external_scorer(
    source: ExternalRewardModel, device: torch.device, dtype: torch.dtype = torch.float32
) -> ExternalRewardScorer:
    tokenizer = load_external_tokenizer(source.name_or_path, source.revision)
    model = load_external_reward_model(source.name_or_path, tokenizer, dtype, device, source.revision)
    model.requires_grad_(False)
    return ExternalRewardScorer(model, tokenizer, source.max_length, source.batch_size, device, source.use_chat_template)


def trained_scorer(
    folder: Path, reward: RewardModelConfig, device: torch.device, dtype: torch.dtype = torch.float32
) -> RewardScorer:
    """A reward model this pipeline trained (`reward/model` or `reward/judge`), in the pipeline's
    format, scoring at the reward stage's `max_length`, `score_batch_size` pairs at a time."""
    tokenizer = load_tokenizer(folder)
    model = load_reward_model(folder, tokenizer, dtype=dtype, device=device)
    model.requires_grad_(False)
    return RewardScorer(model, tokenizer, reward.max_length, reward.score_batch_size, device)


def pipeline_scorer(
    folder: Path, config: PipelineConfig, device: torch.device, dtype: torch.dtype = torch.float32
) -> RewardScorer:
    """`trained_scorer` with a run's config (for tools that hold one: `rm_eval`, the reward stage)."""
    return trained_scorer(folder, config.reward, device, dtype)


def build_reward(
    rewards: RewardsConfig,
    reward: RewardModelConfig,
    reward_dir: Path,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> MixedReward:
    """The configured reward source; `reward_dir` is the reward stage folder (its RM is the default,
    scored as `reward` says)."""
    model: Scorer | None = None
    if rewards.model_weight != 0:
        model = (
            external_scorer(rewards.model, device, dtype)
            if rewards.model is not None
            else trained_scorer(reward_dir / "model", reward, device, dtype)
        )
    return MixedReward(model, rewards.model_weight, RuleSet(rewards.rules))


def build_judge(judge: JudgeConfig, reward: RewardModelConfig, reward_dir: Path, device: torch.device) -> Scorer | None:
    """The evaluation's judge, or None when `judge.source` is `none` (a split judge scores as `reward` says)."""
    if judge.source == "none":
        return None
    if judge.source == "split":
        return trained_scorer(reward_dir / JUDGE_FOLDER, reward, device)
    return external_scorer(judge.model, device)
