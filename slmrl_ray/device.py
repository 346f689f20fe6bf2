"""The one place that decides device and dtype.

Everything else receives a resolved `torch.device` and `torch.dtype`. PPO runs in
float32 (the study's recipe and its second fix, SPEC 1.2/1.3: bf16 importance ratios
explode below ~200M parameters); bf16 is an explicit `ppo.precision`, used only on a
CUDA device that supports it, never on the CPU.
"""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then the CPU; anything else is taken as given."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def training_precision(precision: str, device: torch.device) -> str:
    """Resolve a stage's 'auto' | 'bf16' | 'fp32' to 'bf16' or 'fp32' for this device."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise RuntimeError(f"bf16 was requested but {device} does not support it")
    return precision


def ppo_dtype(
    precision: str, num_parameters: int, device: torch.device, fp32_below_params: int
) -> torch.dtype:
    """PPO's dtype: float32 unless the config asks otherwise.

    'fp32' (the default, and the study's recipe: SPEC 1.2 runs PPO in float32 for every
    model); 'bf16' is an explicit choice and an error where the device lacks it; 'auto'
    takes bf16 on a bf16 device for models of at least `fp32_below_params` parameters
    (bf16 importance ratios explode below ~200M).
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if not bf16_supported(device):
            raise RuntimeError(f"ppo.precision=bf16 was requested but {device} does not support it")
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; known: fp32, bf16, auto")
    if num_parameters < fp32_below_params or not bf16_supported(device):
        return torch.float32
    return torch.bfloat16
