""""Did it train?" checks: silent failures of RLHF pipelines become errors that stop a stage.

The original study's PPO trained nothing for a while (a LoRA loaded for inference is
frozen) and nobody noticed. Each check here raises `TrainingCheckError`, never warns.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


class TrainingCheckError(RuntimeError):
    """A stage produced something that cannot be a trained model."""


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters; raises if there are none."""
    snapshot = {
        name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }
    if not snapshot:
        raise TrainingCheckError("the model has no trainable parameters")
    return snapshot


def assert_changed(before: Mapping[str, torch.Tensor], model: torch.nn.Module, what: str) -> float:
    """Raise unless the LoRA weights (those named 'lora_') moved; returns the largest change."""
    params = dict(model.named_parameters())
    lora_names = [n for n in before if "lora_" in n] or list(before)
    largest = max(
        float((params[n].detach().float().cpu() - before[n]).abs().max()) for n in lora_names
    )
    if largest == 0.0:
        raise TrainingCheckError(f"{what}: the LoRA weights did not change during training")
    return largest


def assert_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingCheckError(f"{what}: non-finite values in {name}")


def assert_responses_nonempty(responses: Sequence[str], max_empty_fraction: float) -> float:
    """A response is empty when its decoded text is only whitespace. Returns the fraction.

    Counted on the text, not on tokens: a response of a lone newline or space token is as
    empty to a reader (and to a reward model) as one that is just EOS.
    """
    empty = sum(not text.strip() for text in responses) / max(len(responses), 1)
    if empty > max_empty_fraction:
        raise TrainingCheckError(
            f"{empty:.0%} of the batch's responses are empty (limit {max_empty_fraction:.0%})"
        )
    return empty
