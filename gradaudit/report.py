"""The leakage report: schema-versioned `report.json`, `report.md` and a self-contained HTML."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import __version__
from .audit import THREAT_MODEL, AuditResult
from .errors import GradAuditError
from .families import modules_label
from .io import atomic_write_json, atomic_write_text, private_dir
from .metrics import METRIC_CONFIG

SCHEMA_VERSION = 1
SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "token_recall", "exact")
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
            value = getattr(audit, k)
            entry[k] = value if entry[k] is None else max(entry[k], value)
    return out


def redact_report(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of a report dict with every audit's text removed (scores and counts stay)."""
    audits = [AuditResult.from_dict(a).redact().to_dict() for a in report["audits"]]
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
        values = [s[key] for s in report["summary"].values() if s[key] is not None]
        out[key] = max(values) if values else None
    return out


def has_text(audit: dict[str, Any]) -> bool:
    """Whether an audit dict still holds its references and reconstructions."""
    return not audit["redacted"] and bool(audit["references"])


def fmt_score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_number(value: float | None) -> str:
    return "-" if value is None else "∞" if math.isinf(value) else f"{value:.3g}"


def dp_lines(report: dict[str, Any]) -> list[str]:
    """The DP assumptions in words: the privacy statement, or why there is none."""
    privacy = report.get("privacy")
    epsilon = report_epsilon(report)
    if privacy:
        return [privacy.get("statement") or f"ε = {fmt_number(epsilon)}."]
    if epsilon is not None:
        return [f"ε = {fmt_number(epsilon)}; no statement of its assumptions was recorded."]
    return ["None stated: no differential-privacy accounting was recorded for this run."]


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary of a report dict."""
    worst = worst_case(report)
    epsilon = report_epsilon(report)
    lines = [
        "# gradaudit leakage report",
        "",
        f"**Worst case:** ROUGE-1 {fmt_score(worst['rouge1'])}, ROUGE-2 "
        f"{fmt_score(worst['rouge2'])}, token recall {fmt_score(worst['token_recall'])}"
        + ("" if epsilon is None else f"; ε = {fmt_number(epsilon)}")
        + f" ({summarized_audits(report)} audits).",
        "",
        f"Threat model: {report['threat_model']}.",
        "",
        "Metrics: " + "; ".join(f"{k}: {v}" for k, v in report["metric_config"].items()) + ".",
        "",
        "Differential privacy: " + " ".join(dp_lines(report)),
        "",
        "## Worst case per module",
        "",
        "| modules | audits | errors | ROUGE-1 | ROUGE-2 | token recall | exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for modules, s in report["summary"].items():
        lines.append(
            f"| {modules_label(modules.split(', '))} | {s['audits']} | {s['errors']} | "
            f"{fmt_score(s['rouge1'])} | {fmt_score(s['rouge2'])} | "
            f"{fmt_score(s['token_recall'])} | {fmt_score(s['exact'])} |"
        )
    lines += [
        "",
        "## Audits",
        "",
        "| # | step | modules | attack | gradient | B | ROUGE-1 | ROUGE-2 | ROUGE-L | recall "
        "| ε | s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(report["audits"]):
        lines.append(
            f"| {i} | {a['step'] if a['step'] is not None else '-'} | "
            f"{modules_label(a['modules'])} | {a['attack']} | {a['gradient']} | "
            f"{a['batch_size']} | {fmt_score(a['rouge1'])} | {fmt_score(a['rouge2'])} | "
            f"{fmt_score(a['rougeL'])} | {fmt_score(a['token_recall'])} | "
            f"{fmt_number(a['epsilon'])} | {a['seconds']:.1f} | {a['error'] or ''} |"
        )
    lines += ["", "## Reconstructions", ""]
    if report["redacted"]:
        lines.append("Text redacted: scores, lengths and counts only.")
    for i, a in enumerate(report["audits"]):
        if not has_text(a):
            continue
        for s in a["sentences"]:
            lines += [
                f"- audit {i}, ROUGE-1 {s['rouge1']:.2f}",
                f"  - reference:      `{a['references'][s['reference']]}`",
                f"  - reconstruction: `{a['reconstructions'][s['reconstruction']]}`",
            ]
    lines += ["", "## Configuration", "", "```json", json.dumps(report["config"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def write_report(directory: str | Path, report: dict[str, Any]) -> Path:
    """Write `report.json`, `report.md` and `report.html` atomically (0600, directory 0700)."""
    from .report_html import render_html

    directory = private_dir(directory)
    atomic_write_json(directory / "report.json", report)
    atomic_write_text(directory / "report.md", render_markdown(report))
    atomic_write_text(directory / "report.html", render_html(report))
    return directory / "report.json"


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
