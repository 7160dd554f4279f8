"""LoRA adapters (PEFT) as gradaudit sees them: names, ranks and what their gradients hold.

PEFT wraps a linear module `query` as `query.base_layer` (frozen) plus `query.lora_A.<adapter>`
(in -> r) and `query.lora_B.<adapter>` (r -> out), computing `W x + s B A dropout(x)`. Both
parts are `nn.Linear`, so capture and attacks treat them as linear modules: lora_A's inputs are
the wrapped module's own inputs (through `lora_dropout`), lora_B's are `A dropout(x)`. The
gradient `dL/dA = s B^T delta x^T` has rank at most min(r, tokens). Duck-typed: gradaudit's
core never imports peft.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from gradaudit.errors import GradAuditError

LORA_PARTS = ("lora_A", "lora_B")
BOTH_PARTS = "lora"  # a spec suffix selecting lora_A and lora_B
_PART_NAME = re.compile(r"^(?P<base>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)$")


def is_peft_model(model: nn.Module) -> bool:
    """True for a PEFT wrapper (`PeftModel` and its task subclasses)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT's wrappers (`model` itself when not wrapped)."""
    return model.get_base_model() if is_peft_model(model) else model


def check_supported(model: nn.Module) -> None:
    """Refuse PEFT methods other than plain LoRA, naming what is supported."""
    if not is_peft_model(model):
        return
    for adapter, config in model.peft_config.items():
        method = getattr(getattr(config, "peft_type", None), "value", None) or type(config).__name__
        if method != "LORA":
            raise GradAuditError(
                f"PEFT method {method} (adapter {adapter!r}) is not supported yet: gradaudit "
                "audits LoRA adapters (peft.LoraConfig) and full fine-tuning"
            )
        if getattr(config, "use_dora", False):
            raise GradAuditError(
                f"DoRA (adapter {adapter!r}, use_dora=True) is not supported yet: gradaudit "
                "audits plain LoRA adapters (use_dora=False) and full fine-tuning"
            )


def is_lora_wrapper(module: nn.Module) -> bool:
    """True for PEFT's LoRA layer around a base module (it holds lora_A and lora_B)."""
    parts = [getattr(module, part, None) for part in LORA_PARTS]
    return hasattr(module, "base_layer") and all(isinstance(p, nn.ModuleDict) for p in parts)


def split_part(name: str) -> tuple[str, str | None]:
    """(wrapped module name, "lora_A" / "lora_B") of an adapter part's name; (name, None) for
    any other module."""
    match = _PART_NAME.match(name)
    return (match["base"], match["part"]) if match else (name, None)


def part_names(model: nn.Module, wrapped: str, part: str, spec: str) -> list[str]:
    """Full names of the `part` ("lora_A", "lora_B" or "lora" for both) of every active adapter
    on module `wrapped`; a clear error when `wrapped` carries no LoRA adapter."""
    module = model.get_submodule(wrapped)
    if not is_lora_wrapper(module):
        raise GradAuditError(
            f"{spec!r}: {wrapped!r} carries no LoRA adapter (it is a {type(module).__name__}): "
            "drop the :lora suffix, or wrap the model with peft.get_peft_model and a LoraConfig "
            "whose target_modules include it"
        )
    parts = LORA_PARTS if part == BOTH_PARTS else (part,)
    active = getattr(module, "active_adapters", None) or list(module.lora_A)
    return [f"{wrapped}.{p}.{a}" for a in active if a in module.lora_A for p in parts]


@dataclass(frozen=True)
class LoraPart:
    """One adapter part: its wrapped module, rank `r`, scaling `s` and `lora_dropout` rate."""

    name: str
    wrapped: str
    part: str
    adapter: str
    rank: int
    scaling: float
    dropout: float


def lora_part(model: nn.Module, name: str) -> LoraPart | None:
    """The LoRA part named `name` of `model`, or None when `name` is not one."""
    match = _PART_NAME.match(name)
    if match is None:
        return None
    wrapper = model.get_submodule(match["base"])
    if not is_lora_wrapper(wrapper):
        return None
    adapter = match["adapter"]
    dropout = wrapper.lora_dropout[adapter]
    return LoraPart(
        name=name,
        wrapped=match["base"],
        part=match["part"],
        adapter=adapter,
        rank=int(wrapper.r[adapter]),
        scaling=float(wrapper.scaling[adapter]),
        dropout=float(getattr(dropout, "p", 0.0)),
    )


def combined_dropout(rate: float, lora: LoraPart | None) -> float:
    """The dropout rate a lora_A input sees: the wrapped module's input dropout `rate`, then
    `lora_dropout` (two inverted dropouts compose into one with keep rate the product)."""
    if lora is None or lora.dropout == 0:
        return rate
    return 1 - (1 - rate) * (1 - lora.dropout)


def rank_bound(model: nn.Module, name: str, rows: int) -> int:
    """The most rank module `name`'s weight gradient (with `rows` rows) can have whatever the
    tokens: `rows`, or for a lora_A part the numerical rank of its lora_B, since its gradient
    is `s B^T delta x^T` (early in training B's rank may still be below r)."""
    part = lora_part(model, name)
    if part is None or part.part != "lora_A":
        return rows
    b = model.get_submodule(f"{part.wrapped}.lora_B.{part.adapter}").weight.detach()
    rounding = torch.finfo(b.dtype).eps * max(b.shape)  # B's own precision, not float64's
    return min(rows, int(torch.linalg.matrix_rank(b.double(), rtol=rounding)))


def zero_gradient_reason(model: nn.Module, modules: list[str]) -> str:
    """Why the observed adapter gradients are zero, when they are lora_A parts whose lora_B
    is still zero (PEFT's initialisation); "" otherwise."""
    parts = [lora_part(model, m) for m in modules]
    if not parts or any(p is None or p.part != "lora_A" for p in parts):
        return ""
    zero_b = all(
        not torch.any(model.get_submodule(f"{p.wrapped}.lora_B.{p.adapter}").weight)
        for p in parts
        if p is not None
    )
    if not zero_b:
        return ""
    return (
        "nothing to recover from lora_A at this step: lora_B is still zero (PEFT initialises "
        "B = 0), so no gradient reaches lora_A until training has moved B; audit a later step "
        "or lora_B"
    )
