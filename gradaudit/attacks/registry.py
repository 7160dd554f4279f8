"""Attacks by name: `get_attack(name, **options)` builds one, `register_attack` adds one.

Built-in attacks are imported when first asked for (`auto` itself builds attacks through
here, and importing gradaudit need not load every attack).
"""

from __future__ import annotations

import importlib
from typing import Any

from gradaudit.attacks.base import Attack
from gradaudit.errors import GradAuditError

_REGISTRY: dict[str, str | type[Attack]] = {
    "gradmatch": "gradaudit.attacks.gradmatch:GradMatchAttack",
    "span": "gradaudit.attacks.span.attack:SpanAttack",
    "auto": "gradaudit.attacks.auto:AutoAttack",
    "causal": "gradaudit.attacks.causal.attack:CausalSpanAttack",
}


def register_attack(name: str, attack: type[Attack] | str) -> None:
    """Make `attack` (an `Attack` subclass, or "module:Class" to import lazily) known as `name`."""
    if not isinstance(attack, str) and not (
        isinstance(attack, type) and issubclass(attack, Attack)
    ):
        raise GradAuditError(
            f"{attack!r} is not an Attack subclass: subclass gradaudit.Attack and register "
            "the class (or a 'module:Class' string)"
        )
    _REGISTRY[name] = attack


def attack_names() -> list[str]:
    """Names `get_attack` accepts, sorted."""
    return sorted(_REGISTRY)


def get_attack(name: str, **options: Any) -> Attack:
    """The attack called `name`, configured with `options` (unknown names are an error)."""
    if name not in _REGISTRY:
        raise GradAuditError(f"unknown attack {name!r}: choose one of {', '.join(attack_names())}")
    attack = _REGISTRY[name]
    if isinstance(attack, str):
        module, cls = attack.split(":")
        attack = getattr(importlib.import_module(module), cls)
    return attack(**options)
