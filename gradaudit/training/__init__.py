"""Auditing during training: `Auditor` (wiring) and `AuditConfig` (what to audit).

`config` what to audit; `recorder` batches and sampling; `sources` where a step's gradient
comes from (`dp_source` for a DP-SGD release); `dispatch` saving and attacking; `attacker`
the spawned worker's bounded lifecycle, `worker` what runs in it; `results` the one store of
results (pending from capture on) and the report; `auditor` wires them.
"""

from gradaudit.training.auditor import Auditor
from gradaudit.training.config import AuditConfig

__all__ = ["AuditConfig", "Auditor"]
