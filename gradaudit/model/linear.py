"""Linear modules as gradaudit sees them: `nn.Linear`, and GPT-2's `Conv1D`.

`Conv1D` computes `x @ W + b` with its weight stored (in, out), the transpose of an
`nn.Linear`'s (out, in). Capture keeps each weight's gradient as `.grad` holds it; attacks run
on a private copy where every `Conv1D` became the equivalent `nn.Linear` (`to_linear`), with
the snapshot's gradients transposed to match (`GradientSnapshot.as_linear`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)
LINEAR_NAMES = "nn.Linear or Conv1D"


def is_linear(module: nn.Module) -> bool:
    """True for the module types gradaudit captures and attacks."""
    return isinstance(module, LINEAR_TYPES)


def input_width(module: nn.Module) -> int:
    """How many features a linear module takes per token."""
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0])
    return int(module.in_features)


def conv1d_names(model: nn.Module) -> list[str]:
    """Names of the `Conv1D` modules of `model`."""
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def uniform_copy(model: nn.Module) -> list[str]:
    """Make a private copy of a model look the same to every attack, in place: `Conv1D` as
    `nn.Linear` (`to_linear`) and no token types where the family has none. Returns the
    converted modules' names: `GradientSnapshot.as_linear` transposes their gradients."""
    from gradaudit.model.batch import ignore_absent_inputs

    ignore_absent_inputs(model)
    return to_linear(model)


def to_linear(model: nn.Module) -> list[str]:
    """Replace, in place, every `Conv1D` of `model` by the `nn.Linear` computing the same
    function (weight transposed, same names, same requires_grad); return their names.

    For private copies only (an attack's model): the module objects change.
    """
    names = conv1d_names(model)
    for name in names:
        conv = model.get_submodule(name)
        weight = conv.weight.detach()
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias.detach())
        linear.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            linear.bias.requires_grad_(conv.bias.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return names
