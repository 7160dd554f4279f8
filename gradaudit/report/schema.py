"""The report's schema: build `report.json`'s dict, read it back, and summarise it.

`docs/report-schema.md` documents the fields; `SCHEMA_VERSION` changes when they do.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gradaudit._version import __version__
from gradaudit.errors import GradAuditError
from gradaudit.scoring.metrics import METRIC_CONFIG, SCORE_KEYS
from gradaudit.scoring.result import THREAT_MODEL, AuditResult, redacted_audit

SCHEMA_VERSION = 1
REQUIRED_KEYS = (
    "schema_version", "threat_model", "metric_config", "config", "redacted", "epsilon",
    "privacy", "summary", "audits",
)  # fmt: skip


def build_report(
    audits: Iterable[AuditResult],
    *,
    config: dict[str, Any],
    redact: bool = False,
    epsilon: float | None = None,
    privacy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict; with `redact`, no training text at all."""
    audits = [a.redact() if redact else a for a in audits]
    return {
        "schema_version": SCHEMA_VERSION,
        "gradaudit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threat_model": THREAT_MODEL,
        "metric_config": METRIC_CONFIG,
        "config": config,
        "redacted": redact,
        "epsilon": epsilon,
        "privacy": privacy,
        "summary": summarize(audits),
        "audits": [a.to_dict() for a in audits],
    }


def summarize(audits: Iterable[AuditResult]) -> dict[str, dict[str, Any]]:
    """Worst (highest) score per module set over all audits that ran, contrast ones left out."""
    out: dict[str, dict[str, Any]] = {}
    for audit in audits:
        if audit.contrast:
            continue  # a gradient that was never released says nothing about this run's leakage
        key = ", ".join(audit.modules)
        entry = out.setdefault(key, {"audits": 0, "errors": 0, **{k: None for k in SCORE_KEYS}})
        entry["audits"] += 1
        if audit.error is not None:
            entry["errors"] += 1
            continue
        for k in SCORE_KEYS:
            value = getattr(audit, k)  # None: a score this audit's version did not compute
            if value is not None:
                entry[k] = value if entry[k] is None else max(entry[k], value)
    return out


def redact_report(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of a report dict with every audit's text removed (scores and counts stay)."""
    # as dicts: an audit holding a field this version does not know is redacted too
    audits = [redacted_audit(audit) for audit in report["audits"]]
    return {**report, "redacted": True, "audits": audits}


def report_epsilon(report: dict[str, Any]) -> float | None:
    """The report's ε: its own, else its privacy statement's, else None (not known)."""
    if report.get("epsilon") is not None:
        return report["epsilon"]
    return (report.get("privacy") or {}).get("epsilon")


def summarized_audits(report: dict[str, Any]) -> int:
    """How many audits the summary (and so the worst case) covers."""
    return sum(s["audits"] for s in report["summary"].values())


def worst_case(report: dict[str, Any]) -> dict[str, float | None]:
    """The highest of each score over every module set (None when no audit ran)."""
    out: dict[str, float | None] = {}
    for key in SCORE_KEYS:
        values = [s[key] for s in report["summary"].values() if s.get(key) is not None]
        out[key] = max(values) if values else None
    return out


def has_text(audit: dict[str, Any]) -> bool:
    """Whether an audit dict still holds its references and reconstructions."""
    return not audit["redacted"] and bool(audit["references"])


def read_report(directory: str | Path) -> dict[str, Any]:
    """Load `report.json` of an audit directory, refusing schemas newer than this version."""
    path = Path(directory) / "report.json"
    if not path.is_file():
        raise GradAuditError(f"{directory} has no report.json: pass an audit output directory")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise GradAuditError(f"{path} is not valid JSON ({error}): re-run the audit") from None
    version = report.get("schema_version") if isinstance(report, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise GradAuditError(f"{path} has no integer schema_version: not a gradaudit report")
    if version > SCHEMA_VERSION:
        raise GradAuditError(
            f"{path} has schema_version {version}, newer than schema_version {SCHEMA_VERSION} "
            f"that gradaudit {__version__} reads: upgrade gradaudit"
        )
    missing = [key for key in REQUIRED_KEYS if key not in report]
    if missing:
        raise GradAuditError(f"{path} lacks {', '.join(missing)}: not a complete gradaudit report")
    return report
