"""Thin adapters from training frameworks to the core `gradaudit.Auditor`.

`GradAuditCallback` (transformers.Trainer) and `AccelerateAuditor` (Accelerate) are imported
on first use, so importing this package imports neither framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradaudit.integrations.accelerate import AccelerateAuditor
    from gradaudit.integrations.trainer import GradAuditCallback

_LAZY = {
    "AccelerateAuditor": "gradaudit.integrations.accelerate",
    "GradAuditCallback": "gradaudit.integrations.trainer",
}

__all__ = ["AccelerateAuditor", "GradAuditCallback"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
