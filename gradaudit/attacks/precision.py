"""Rough twins: a copy of the model in a narrower dtype that ranks or filters candidates, so
that only the few that may fit are computed at full precision."""

from __future__ import annotations

import copy

import torch
from torch import nn

ROUGH_CHOICES = ("auto", "none", "bfloat16", "float16")


def rough_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The dtype of a rough twin for option `choice` on `device`, or None."""
    if choice != "auto":
        return None if choice == "none" else getattr(torch, choice)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    # Without native support (no AVX-512-BF16 or AMX) bfloat16 is emulated and slower.
    cpu = torch.cpu
    native = getattr(cpu, "_is_avx512_bf16_supported", None) or getattr(
        cpu, "_is_amx_tile_supported", None
    )
    return torch.bfloat16 if device.type == "cpu" and native is not None and native() else None


def rough_twin(model: nn.Module, dtype: torch.dtype | None) -> nn.Module | None:
    """A copy of `model` in `dtype`, or None where there is no rough dtype or the model
    already computes in one at most as wide, or in integers (quantized): no gain."""
    if dtype is None:
        return None
    own = next(model.parameters()).dtype
    if not own.is_floating_point or torch.finfo(own).bits <= torch.finfo(dtype).bits:
        return None
    return copy.deepcopy(model).to(dtype)
