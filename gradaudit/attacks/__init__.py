"""Inversion attacks behind one `Attack` interface; `get_attack(name, **options)` builds one."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import GradAuditError
from .base import Attack, Reconstruction

# Attacks are imported when first asked for: `auto` itself builds attacks through this module,
# and importing gradaudit need not load every attack.
_REGISTRY: dict[str, str] = {
    "gradmatch": "gradaudit.attacks.gradmatch:GradMatchAttack",
    "span": "gradaudit.attacks.span:SpanAttack",
    "auto": "gradaudit.attacks.auto:AutoAttack",
}


def attack_names() -> list[str]:
    return sorted(_REGISTRY)


def get_attack(name: str, **options: Any) -> Attack:
    """The attack called `name`, configured with `options` (unknown names are an error)."""
    if name not in _REGISTRY:
        raise GradAuditError(f"unknown attack {name!r}: choose one of {', '.join(attack_names())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["Attack", "Reconstruction", "attack_names", "get_attack"]
