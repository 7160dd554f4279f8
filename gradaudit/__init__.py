"""gradaudit: measure how much training text leaks from shared partial gradients."""

__version__ = "0.1.0"

from .assertions import assert_leaks, assert_no_leakage  # noqa: E402
from .attacks import Attack, Reconstruction, get_attack  # noqa: E402
from .audit import THREAT_MODEL, AuditResult, audit_batch, audit_snapshot  # noqa: E402
from .audit_config import AuditConfig  # noqa: E402
from .auditor import Auditor  # noqa: E402
from .errors import GradAuditError  # noqa: E402
from .models import load_model  # noqa: E402
from .selection import select_modules  # noqa: E402
from .snapshot import GradientSnapshot, capture  # noqa: E402

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
