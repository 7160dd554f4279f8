"""The leakage report: schema-versioned `report.json` and a readable `report.md`."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import __version__
from .audit import THREAT_MODEL, AuditResult
from .errors import GradAuditError
from .io import atomic_write_json, atomic_write_text, private_dir
from .metrics import METRIC_CONFIG

SCHEMA_VERSION = 1
SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "token_recall", "exact")


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
    """Worst (highest) score per module set over all audits that ran."""
    out: dict[str, dict[str, Any]] = {}
    for audit in audits:
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


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary of a report dict."""
    lines = [
        "# gradaudit leakage report",
        "",
        f"Threat model: {report['threat_model']}.",
        "",
        "Metrics: " + "; ".join(f"{k}: {v}" for k, v in report["metric_config"].items()) + ".",
        "",
    ]
    if report.get("epsilon") is not None:
        lines += [f"Differential privacy: ε = {report['epsilon']:.3g}.", ""]
    lines += [
        "## Worst case per module",
        "",
        "| modules | audits | errors | ROUGE-1 | ROUGE-2 | token recall |",
        "|---|---|---|---|---|---|",
    ]
    for modules, s in report["summary"].items():
        lines.append(
            f"| {modules} | {s['audits']} | {s['errors']} | {_fmt(s['rouge1'])} | "
            f"{_fmt(s['rouge2'])} | {_fmt(s['token_recall'])} |"
        )
    lines += [
        "",
        "## Audits",
        "",
        "| # | step | modules | attack | gradient | B | ROUGE-1 | ROUGE-2 | ROUGE-L | recall "
        "| s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(report["audits"]):
        lines.append(
            f"| {i} | {a['step'] if a['step'] is not None else '-'} | {', '.join(a['modules'])} | "
            f"{a['attack']} | {a['gradient']} | {a['batch_size']} | {_fmt(a['rouge1'])} | "
            f"{_fmt(a['rouge2'])} | {_fmt(a['rougeL'])} | {_fmt(a['token_recall'])} | "
            f"{a['seconds']:.1f} | {a['error'] or ''} |"
        )
    if not report["redacted"]:
        lines += ["", "## Reconstructions", ""]
        for i, a in enumerate(report["audits"]):
            for s in a["sentences"]:
                lines += [
                    f"- audit {i}, ROUGE-1 {s['rouge1']:.2f}",
                    f"  - reference:      `{a['references'][s['reference']]}`",
                    f"  - reconstruction: `{a['reconstructions'][s['reconstruction']]}`",
                ]
    else:
        lines += ["", "Text redacted: scores, lengths and counts only."]
    return "\n".join(lines) + "\n"


def write_report(directory: str | Path, report: dict[str, Any]) -> Path:
    """Write `report.json` and `report.md` atomically (mode 0600, directory 0700)."""
    directory = private_dir(directory)
    atomic_write_json(directory / "report.json", report)
    atomic_write_text(directory / "report.md", render_markdown(report))
    return directory / "report.json"


def read_report(directory: str | Path) -> dict[str, Any]:
    """Load `report.json` of an audit directory, refusing schemas newer than this version."""
    path = Path(directory) / "report.json"
    if not path.is_file():
        raise GradAuditError(f"{directory} has no report.json: pass an audit output directory")
    report = json.loads(path.read_text(encoding="utf-8"))
    version = report.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise GradAuditError(
            f"{path} has schema_version {version}, newer than the {SCHEMA_VERSION} this gradaudit "
            f"{__version__} reads: upgrade gradaudit"
        )
    return report
