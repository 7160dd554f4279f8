"""Choosing which linear modules' gradients are captured and attacked."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

from torch import nn

from gradaudit.errors import GradAuditError
from gradaudit.model.families import COMPONENTS, layout
from gradaudit.model.linear import LINEAR_NAMES, is_linear
from gradaudit.model.lora import (
    BOTH_PARTS,
    LORA_PARTS,
    check_supported,
    is_lora_wrapper,
    part_names,
    split_part,
)

PRESET_COMPONENTS = (*COMPONENTS, "layer", "all")


def parse_layers(text: str, num_layers: int) -> list[int]:
    """Layer indices of `3`, `0-2`, `0,4`, `last` or `all`."""
    if text == "all":
        return list(range(num_layers))
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if part == "last":
                layers.append(num_layers - 1)
            elif "-" in part:
                start, end = (int(x) for x in part.split("-", 1))
                layers.extend(range(start, end + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise GradAuditError(
                f"bad layer list {text!r}: use e.g. 3, 0-2, 0,4, last or all"
            ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise GradAuditError(f"layers {bad} out of range: the model has layers 0-{num_layers - 1}")
    return layers


def _preset(model: nn.Module, spec: str) -> list[str]:
    preset, _, part = spec.partition(":")
    if part and part not in (*LORA_PARTS, BOTH_PARTS):
        raise GradAuditError(
            f"unknown adapter part {part!r} in {spec!r}: use {', '.join(LORA_PARTS)} or "
            f"{BOTH_PARTS} (both), e.g. query@2:lora_A"
        )
    names = _component_names(model, preset)
    if not part:
        return names
    if preset.startswith(("layer@", "all@")):  # the adapter parts among the layer's modules
        wanted = LORA_PARTS if part == BOTH_PARTS else (part,)
        return [n for n in names if split_part(n)[1] in wanted]
    return [p for n in names for p in part_names(model, n, part, spec)]


def _component_names(model: nn.Module, spec: str) -> list[str]:
    component, _, layers_text = spec.partition("@")
    if component not in PRESET_COMPONENTS:
        raise GradAuditError(
            f"unknown component {component!r} in {spec!r}: "
            f"choose one of {', '.join(PRESET_COMPONENTS)}"
        )
    lay = layout(model)
    if component not in (*lay.components, "layer", "all"):
        lay.component_name(component, 0)  # the family lacks it: the error lists its components
    names: list[str] = []
    for layer in parse_layers(layers_text, lay.num_layers):
        if component in ("layer", "all"):
            prefix = lay.layer_prefix(layer)
            linear = [
                (n, m) for n, m in model.named_modules() if n.startswith(prefix) and is_linear(m)
            ]
            # The trainable ones (with adapters, a frozen base has no gradient); if none is,
            # all of them, which `_check_linear` refuses by name.
            trainable = [n for n, m in linear if m.weight.requires_grad]
            names.extend(trainable or [n for n, _ in linear])
        else:
            names.append(lay.component_name(component, layer))
    return names


def _check_linear(model: nn.Module, name: str, spec: str) -> None:
    module = model.get_submodule(name)
    if is_lora_wrapper(module):
        if "@" in spec:
            instead = f"{spec}:lora_A, {spec}:lora_B or {spec}:lora (both)"
        else:
            instead = f"{name}.lora_A.* or {name}.lora_B.*"
        raise GradAuditError(
            f"{spec!r} matches {name!r}, which a LoRA adapter wraps: its base weight is frozen, "
            f"so the gradient shared is the adapter's; select {instead}"
        )
    if not is_linear(module):
        raise GradAuditError(
            f"{spec!r} matches {name!r}, a {type(module).__name__}, not {LINEAR_NAMES}: "
            "gradaudit attacks linear modules; narrow the spec to their names"
        )
    if not module.weight.requires_grad:
        raise GradAuditError(
            f"{spec!r} matches {name!r}, whose weight is frozen (requires_grad=False), so it has "
            "no gradient to leak: unfreeze it or select another module"
        )


def select_modules(model: nn.Module, specs: str | Iterable[str]) -> list[str]:
    """Ordered, de-duplicated names of the linear modules (`nn.Linear`, GPT-2's `Conv1D`)
    selected by `specs`.

    A spec is a preset `COMPONENT@LAYERS` (e.g. `query@2`, `ffn_out@0-2`, `layer@last`,
    `all@all`; the components a family has are in its adapter, see `families`) or an
    `fnmatch` glob over `model.named_modules()` names. On a LoRA model (PEFT), a preset's
    suffix `:lora_A`, `:lora_B` or `:lora` (both) picks the adapter parts of the modules it
    names (`query@2:lora_A`); globs reach them by their names (`*.query.lora_A.default`).
    """
    check_supported(model)
    if isinstance(specs, str):
        specs = [specs]
    all_names = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for spec in specs:
        if "@" in spec:
            matched = _preset(model, spec)
        else:
            matched = fnmatch.filter(all_names, spec)
            linear = [n for n in matched if is_linear(model.get_submodule(n))]
            # A glob like `*.layer.2.*` also matches containers; keep its linear members.
            matched = linear or matched
        if not matched:
            close = difflib.get_close_matches(spec, all_names, n=5, cutoff=0.0)
            raise GradAuditError(
                f"module spec {spec!r} matches no module; closest names: {', '.join(close)}"
            )
        for name in matched:
            _check_linear(model, name, spec)
        chosen.update(matched)
    return [n for n in all_names if n in chosen]
