"""The PPO actor-critic: a fresh LoRA on the merged SFT weights plus a scalar value head.

Merge-and-reinitialise (the study's first fix, SPEC 1.3): the SFT LoRA was merged into
the base weights by the SFT stage; PPO attaches a *new* LoRA whose B matrices are zero,
so the policy starts exactly at the SFT model and every LoRA weight is trainable (a
LoRA loaded for inference is silently frozen). The frozen reference model is the same
network with the adapter disabled: no second copy of the weights.

The value head reads the backbone's last hidden state, like TRL's former
`AutoModelForCausalLMWithValueHead`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from slmrl_ray.generation import position_ids_from_mask
from slmrl_ray.rl_math import entropy_from_logits, logprobs_from_logits


class ResponseOutputs(NamedTuple):
    """Per-response-token outputs. Shapes: [B, R]."""

    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor


class PolicyWithValueHead(nn.Module):
    def __init__(self, base_model: nn.Module, lora: LoraConfig):
        super().__init__()
        self.policy: PeftModel = get_peft_model(base_model, lora)
        hidden = base_model.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(base_model.parameters()).device)

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
        """Log-probabilities (under the sampling temperature), values and entropy of the responses."""
        input_ids = torch.cat([query_ids, response_ids], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=with_values,
            use_cache=False,
        )
        start, width = query_ids.shape[1] - 1, response_ids.shape[1]
        logits = output.logits[:, start : start + width].float() / temperature
        logprobs = logprobs_from_logits(logits, response_ids)
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        if with_values:
            hidden = output.hidden_states[-1][:, start : start + width].float()
            values = self.value_head(hidden).squeeze(-1)
        else:
            values = torch.zeros_like(logprobs)
        return ResponseOutputs(logprobs, values, entropy)
