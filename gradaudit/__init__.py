"""gradaudit: measure how much training text leaks from shared partial gradients.

The public API below is imported on first use, so `import gradaudit` and the command line's
`--help` do not load torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradaudit._version import __version__

_EXPORTS = {
    "Attack": "gradaudit.attacks.base",
    "AuditConfig": "gradaudit.training.config",
    "AuditResult": "gradaudit.scoring.result",
    "Auditor": "gradaudit.training.auditor",
    "GradAuditError": "gradaudit.errors",
    "GradientSnapshot": "gradaudit.gradients.snapshot",
    "Reconstruction": "gradaudit.attacks.base",
    "THREAT_MODEL": "gradaudit.scoring.result",
    "assert_leaks": "gradaudit.report.assertions",
    "assert_no_leakage": "gradaudit.report.assertions",
    "audit_batch": "gradaudit.scoring.audit",
    "audit_snapshot": "gradaudit.scoring.audit",
    "capture": "gradaudit.gradients.capture",
    "get_attack": "gradaudit.attacks.registry",
    "load_model": "gradaudit.model.loading",
    "select_modules": "gradaudit.model.selection",
}

__all__ = [
    "THREAT_MODEL",
    "Attack",
    "AuditConfig",
    "AuditResult",
    "Auditor",
    "GradAuditError",
    "GradientSnapshot",
    "Reconstruction",
    "__version__",
    "assert_leaks",
    "assert_no_leakage",
    "audit_batch",
    "audit_snapshot",
    "capture",
    "get_attack",
    "load_model",
    "select_modules",
]

if TYPE_CHECKING:
    from gradaudit.attacks.base import Attack, Reconstruction
    from gradaudit.attacks.registry import get_attack
    from gradaudit.errors import GradAuditError
    from gradaudit.gradients.capture import capture
    from gradaudit.gradients.snapshot import GradientSnapshot
    from gradaudit.model.loading import load_model
    from gradaudit.model.selection import select_modules
    from gradaudit.report.assertions import assert_leaks, assert_no_leakage
    from gradaudit.scoring.audit import audit_batch, audit_snapshot
    from gradaudit.scoring.result import THREAT_MODEL, AuditResult
    from gradaudit.training.auditor import Auditor
    from gradaudit.training.config import AuditConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gradaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
