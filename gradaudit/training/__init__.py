"""Auditing during training: `Auditor` (wiring) and `AuditConfig` (what to audit).

`config` what to audit; `recorder` batches and sampling; `sources` where a step's gradient
comes from (`dp_source` for a DP-SGD release); `dispatch` saving and attacking; `worker` the
spawned attack process; `results` results and the report; `auditor` wires them.
"""

from gradaudit.training.auditor import Auditor
from gradaudit.training.config import AuditConfig

__all__ = ["AuditConfig", "Auditor"]
