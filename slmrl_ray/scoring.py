"""Reward-model scoring, formatted exactly as the reward model was trained.

Two scorers: `RewardScorer` for the pipeline's own reward models (the policy's
tokenizer, the pipeline's format) and `ExternalRewardScorer` for any other sequence
classifier with one output, which keeps its own tokenizer and format
(`encode_external`): the cross-tokenizer path.

`encode_reward_text` is the single function that turns (prompt, response) into the
token ids a reward model sees: `data.reward_text` (prompt + "\\n\\n" + response), then
EOS appended, left-truncated to `max_length` so the response end (where the score is
read) always survives. The reward stage builds its training set with it and every
scorer (held-out accuracy, PPO, evaluation) calls it too, so training and scoring
cannot drift apart (a model trained with EOS but scored without it ranks texts
backwards; see PITFALLS). `pairwise_accuracy` is the held-out accuracy of any scorer (the
reward stage's and `external_rm`'s).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmrl_ray.data import PreferencePair, reward_text


def encode_reward_text(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> list[int]:
    ids = tokenizer(reward_text(prompt, response), add_special_tokens=False)["input_ids"]
    return ids[-(max_length - 1) :] + [tokenizer.eos_token_id]


class RewardScorer:
    """Scores (prompt, response) pairs with a sequence-classification reward model."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        device: torch.device,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device

    def encode(self, prompt: str, response: str) -> list[int]:
        return encode_reward_text(self.tokenizer, prompt, response, self.max_length)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """[B] float32 rewards on the CPU: the RM's single logit (at the last token for a decoder)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        scores = []
        for start in range(0, len(encoded), self.batch_size):
            input_ids, attention_mask = pad_right(encoded[start : start + self.batch_size], self.tokenizer.pad_token_id)
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


class Scorer(Protocol):
    """Anything that scores (prompt, response) texts: a reward model, rules, or a mix."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


def pairwise_accuracy(scorer: Scorer, pairs: list[PreferencePair]) -> dict:
    """Held-out accuracy and mean margin on the study's pairs, and apart on the degenerate ones
    (empty and fragment answers: easy, so they would flatter the study's figure)."""
    prompts = [p.prompt for p in pairs]
    chosen = scorer.score(prompts, [p.chosen for p in pairs])
    rejected = scorer.score(prompts, [p.rejected for p in pairs])
    margin = chosen - rejected
    study = torch.tensor([p.kind == "study" for p in pairs], dtype=torch.bool)
    metrics = {
        "heldout_accuracy": float((margin[study] > 0).float().mean()),
        "heldout_margin": float(margin[study].mean()),
        "heldout_pairs": int(study.sum()),
    }
    if (~study).any():
        metrics["heldout_degenerate_accuracy"] = float((margin[~study] > 0).float().mean())
        metrics["heldout_degenerate_pairs"] = int((~study).sum())
    return metrics


def encode_external(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int, use_chat_template: bool
) -> list[int]:
    """Token ids an external reward model sees: a chat when its tokenizer has a template, else a text pair.

    A chat is rendered by the tokenizer's own template (user: prompt, assistant: response)
    and left-truncated, so the end of the response, where a decoder reads its score,
    survives. An encoder gets a text pair, `[CLS] prompt [SEP] response [SEP]` for
    BERT-style ones, truncated longest-first; a decoder without a template gets the
    pipeline's format (`encode_reward_text`: prompt, blank line, response, EOS). Training
    an external model (`external_rm`) and scoring with it both go through here.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response.strip()}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"][-max_length:]
    if getattr(tokenizer, "sep_token", None) is None:
        # A decoder without a chat template has no pair format: use the pipeline's (a pipeline
        # reward model loaded as an external one then scores exactly as it was trained).
        if tokenizer.eos_token_id is not None:
            return encode_reward_text(tokenizer, prompt, response, max_length)
        return tokenizer(reward_text(prompt, response), add_special_tokens=False)["input_ids"][-max_length:]
    return tokenizer(prompt, response.strip(), truncation="longest_first", max_length=max_length)["input_ids"]


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] right-padded ids and attention mask (a classifier pools the last real token)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


class ExternalRewardScorer(RewardScorer):
    """Scores with an external reward model through its own tokenizer (`encode_external`)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        device: torch.device,
        use_chat_template: bool = True,
    ):
        super().__init__(model, tokenizer, max_length, batch_size, device)
        self.use_chat_template = use_chat_template

    def encode(self, prompt: str, response: str) -> list[int]:
        return encode_external(self.tokenizer, prompt, response, self.max_length, self.use_chat_template)
