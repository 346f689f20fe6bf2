"""The PPO actor-critic: a fresh LoRA on the merged SFT weights plus a scalar value head.

Merge-and-reinitialise (the study's first fix, SPEC 1.3): the SFT LoRA was merged into
the base weights by the SFT stage; PPO attaches a *new* LoRA whose B matrices are zero,
so the policy starts exactly at the SFT model and every LoRA weight is trainable (a
LoRA loaded for inference is silently frozen). The frozen reference model is the same
network with the adapter disabled: no second copy of the weights.

By default the value head reads the policy backbone's last hidden state, like TRL's
former `AutoModelForCausalLMWithValueHead`, and starts random. With `ppo.value_init:
reward_model` the value function is a separate critic initialised from the reward model
(the Tulu 3 / SmolTulu practice): the RM's backbone with a fresh LoRA, and its score
head, read at every response step. At each step it starts out predicting the RM's score
of the text so far (at the last step, the response before its EOS), so early advantages
are not noise; it costs a second backbone forward/backward per mini-batch. Its first
predictions are raw RM scores while PPO's returns are normalised scores; rescaling the
head by the first rollout's statistics was tried and is worse (its outputs at prefixes
without EOS, which the RM never trained on, blow up by 1/std), so the value loss simply
starts higher.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from slmrl_ray.checks import assert_finite_state
from slmrl_ray.generation import position_ids_from_mask
from slmrl_ray.rl_math import entropy_from_logits, logprobs_from_logits


class ResponseOutputs(NamedTuple):
    """Per-response-token outputs. Shapes: [B, R]."""

    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor


class RewardModelCritic(nn.Module):
    """A value function initialised from a sequence-classification reward model.

    `reward_model` must share the policy's tokenizer (the pipeline's own RM does: it was
    trained from the SFT model). Its backbone gets a fresh LoRA (so it starts exactly at
    the RM) and its score head is copied into a trainable float32 head.
    """

    def __init__(self, reward_model: nn.Module, lora: LoraConfig):
        super().__init__()
        self.backbone = get_peft_model(reward_model.base_model, dataclasses.replace(lora, task_type=None))
        head = reward_model.score
        self.score = nn.Linear(head.in_features, 1, dtype=torch.float32)
        with torch.no_grad():
            self.score.weight.copy_(head.weight[:1].float())
            self.score.bias.copy_(head.bias[:1].float() if head.bias is not None else torch.zeros(1))
        self.score.to(head.weight.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] values: the score head on every position's last hidden state."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.score(hidden.float()).squeeze(-1)


class PolicyWithValueHead(nn.Module):
    def __init__(self, base_model: nn.Module, lora: LoraConfig, critic: RewardModelCritic | None = None):
        super().__init__()
        self.policy: PeftModel = get_peft_model(base_model, lora)
        self.critic = critic
        self.value_head = None
        if critic is None:  # the default: a random head on the policy's own hidden states
            hidden = base_model.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(next(base_model.parameters()).device)

    def value_state(self) -> dict[str, torch.Tensor]:
        """The value function's trainable weights (the head, or the critic's LoRA and head), on the CPU."""
        module = self.value_head if self.critic is None else self.critic
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
                if self.critic is None or "lora_" in k or k.startswith("score.")}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this block the network is the frozen reference (the merged SFT model)."""
        with self.policy.disable_adapter():
            yield

    def response_outputs(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
        temperature: float,
        with_values: bool = True,
    ) -> ResponseOutputs:
        """Log-probabilities (under the sampling temperature), values and entropy of the responses.

        The LM head runs only where a response token is predicted (the last R + 1 positions):
        at a 50k vocabulary it is a large share of a small model's FLOPs (58 % of Pythia-70M's
        matmul weights), and prompt positions need none.
        """
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        position_ids = position_ids_from_mask(attention_mask)
        start, width = query_ids.shape[1] - 1, response_ids.shape[1]
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=with_values and self.critic is None,
            use_cache=False,
            logits_to_keep=width + 1,  # positions start .. end; the last predicts past the response
        )
        logits = output.logits[:, :width].float() / temperature
        logprobs = logprobs_from_logits(logits, response_ids)
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        if with_values and self.critic is not None:
            values = self.critic(input_ids, attention_mask, position_ids)[:, start : start + width]
        elif with_values:
            hidden = output.hidden_states[-1][:, start : start + width].float()
            values = self.value_head(hidden).squeeze(-1)
        else:
            values = torch.zeros_like(logprobs)
        return ResponseOutputs(logprobs, values, entropy)


def merge_in_fp32(policy: PeftModel) -> nn.Module:
    """Merge the LoRA into the base weights in float32 and return the plain model.

    Merging in bf16 adds the float32 delta B @ A into bf16 weights and rounds most of a
    small delta away (on a PEFT layer, a delta of 0.055 % of |W| kept 24 % of itself), so
    a policy trained in bf16 would be saved as nearly the SFT model. The base weights are
    cast up first (exactly), then the delta is added at full precision.
    """
    return policy.float().merge_and_unload()


def save_merged_policy(policy: PeftModel, tokenizer, target, label: str) -> None:
    """Merge in float32 (`merge_in_fp32`), check every weight is finite, save to `target` with
    the tokenizer: the policy of the `ppo` stage, whichever algorithm trained it."""
    merged = merge_in_fp32(policy)
    assert_finite_state(merged.state_dict(), label)
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
