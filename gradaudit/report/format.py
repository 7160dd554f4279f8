"""How reports print numbers and the DP assumptions: one formatter for every renderer."""

from __future__ import annotations

import math
from typing import Any

from gradaudit.report.schema import report_epsilon


def score(value: float | None) -> str:
    """A score in [0, 1] to three decimals; "-" when there is none."""
    return "-" if value is None else f"{value:.3f}"


def number(value: float | None, digits: int = 3) -> str:
    """A number to `digits` significant digits; "∞" for infinity, "-" for none."""
    if value is None:
        return "-"
    return "∞" if math.isinf(value) else f"{value:.{digits}g}"


def dp_lines(report: dict[str, Any]) -> list[str]:
    """The DP assumptions in words: the privacy statement, or why there is none."""
    privacy = report.get("privacy")
    epsilon = report_epsilon(report)
    if privacy:
        return [privacy.get("statement") or f"ε = {number(epsilon)}."]
    if epsilon is not None:
        return [f"ε = {number(epsilon)}; no statement of its assumptions was recorded."]
    return [
        "None stated: no differential-privacy accounting was recorded for this run. To get it, "
        "train with Opacus and pass privacy_engine= (and dataset_size=) to the Auditor or "
        "GradAuditCallback; `gradaudit dpsweep` shows leakage against σ and ε before a run "
        "goes private."
    ]


# How an audit's error says its snapshot stayed on disk (written by the training package).
SNAPSHOT_KEPT = "its snapshot is kept"


def kept_snapshots_note(report: dict[str, Any]) -> str | None:
    """A warning when snapshots were kept on disk: they hold the batches' text in clear,
    whatever the report's redaction; None when none were kept."""
    keep_all = bool((report.get("config") or {}).get("keep_snapshots"))
    kept = [a for a in report["audits"] if keep_all or SNAPSHOT_KEPT in (a["error"] or "")]
    if not kept:
        return None
    return (
        f"{len(kept)} audit(s) left their gradient snapshot on disk (keep_snapshots, or kept for "
        "a retry): each holds its batch's token ids, which decode to the training text, even "
        "when this report is redacted. Delete the snapshots folder when you are done with it."
    )
