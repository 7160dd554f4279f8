"""gradaudit: measure how much training text leaks from shared partial gradients."""

from gradaudit._version import __version__
from gradaudit.attacks import Attack, Reconstruction, get_attack
from gradaudit.capture.gradients import capture
from gradaudit.capture.snapshot import GradientSnapshot
from gradaudit.errors import GradAuditError
from gradaudit.model.loading import load_model
from gradaudit.model.selection import select_modules
from gradaudit.report.assertions import assert_leaks, assert_no_leakage
from gradaudit.scoring.audit import audit_batch, audit_snapshot
from gradaudit.scoring.result import THREAT_MODEL, AuditResult
from gradaudit.training.auditor import Auditor
from gradaudit.training.config import AuditConfig

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
