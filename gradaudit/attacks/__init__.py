"""Inversion attacks behind one `Attack` interface; `get_attack(name, **options)` builds one."""

from gradaudit.attacks.base import Attack, Reconstruction
from gradaudit.attacks.registry import attack_names, get_attack, register_attack

__all__ = ["Attack", "Reconstruction", "attack_names", "get_attack", "register_attack"]
