"""Reward-model scoring, formatted exactly as the reward model was trained.

`encode_reward_text` is the single function that turns (prompt, response) into the
token ids a reward model sees: `data.reward_text` (prompt + "\\n\\n" + response), then
EOS appended, left-truncated to `max_length` so the response end (where the score is
read) always survives. The reward stage builds its training set with it and every
scorer (held-out accuracy, PPO, evaluation) calls it too, so training and scoring
cannot drift apart (a model trained with EOS but scored without it ranks texts
backwards; see PITFALLS).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slmrl_ray.data import reward_text


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

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """[B] float32 rewards on the CPU: the RM logit at the last (EOS) token."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [
            encode_reward_text(self.tokenizer, p, r, self.max_length)
            for p, r in zip(prompts, responses)
        ]
        scores = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):  # right padding: the classifier pools the last real token
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)
