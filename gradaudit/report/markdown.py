"""`report.md`: the report as Markdown, for terminals, pull requests and chat."""

from __future__ import annotations

import json
from typing import Any

from gradaudit.model.families import modules_label
from gradaudit.report.format import dp_lines, kept_snapshots_note, number, score
from gradaudit.report.schema import has_text, report_epsilon, summarized_audits, worst_case
from gradaudit.report.verdict import levels_line, verdicts


def render_markdown(report: dict[str, Any]) -> str:
    """A human-readable summary of a report dict: verdict first, then the evidence."""
    lines = [
        *_head(report),
        *_summary_table(report),
        *_audit_table(report),
        *_reconstructions(report),
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(report["config"], indent=2),
        "```",
    ]
    return "\n".join(lines) + "\n"


def _head(report: dict[str, Any]) -> list[str]:
    """The verdict, the worst case, and what the scores assume."""
    worst = worst_case(report)
    epsilon = report_epsilon(report)
    return [
        "# gradaudit leakage report",
        "",
        *(f"- **{v.level}** — {v.modules}: {v.sentence}" for v in verdicts(report)),
        "",
        levels_line(),
        "",
        f"**Worst case:** ROUGE-1 {score(worst['rouge1'])}, ROUGE-2 "
        f"{score(worst['rouge2'])}, token recall {score(worst['token_recall'])}, batch ROUGE-1 "
        f"{score(worst['batch_rouge1'])}"
        + ("" if epsilon is None else f"; ε = {number(epsilon)}")
        + f" ({summarized_audits(report)} audits).",
        "",
        f"Threat model: {report['threat_model']}.",
        "",
        "Metrics: " + "; ".join(f"{k}: {v}" for k, v in report["metric_config"].items()) + ".",
        "",
        "Differential privacy: " + " ".join(dp_lines(report)),
        "",
    ]


def _summary_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Worst case per module",
        "",
        "| modules | audits | errors | ROUGE-1 | ROUGE-2 | token recall | exact | batch ROUGE-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for modules, s in report["summary"].items():
        lines.append(
            f"| {modules_label(modules.split(', '))} | {s['audits']} | {s['errors']} | "
            f"{score(s['rouge1'])} | {score(s['rouge2'])} | "
            f"{score(s['token_recall'])} | {score(s['exact'])} | {score(s.get('batch_rouge1'))} |"
        )
    return lines


def _audit_table(report: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Audits",
        "",
        "| # | step | modules | attack | gradient | B | ROUGE-1 | ROUGE-2 | ROUGE-L | recall "
        "| batch R-1 | ε | s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, a in enumerate(report["audits"]):
        lines.append(
            f"| {i} | {a['step'] if a['step'] is not None else '-'} | "
            f"{modules_label(a['modules'])} | {a['attack']} | {a['gradient']} | "
            f"{a['batch_size']} | {score(a['rouge1'])} | {score(a['rouge2'])} | "
            f"{score(a['rougeL'])} | {score(a['token_recall'])} | "
            f"{score(a.get('batch_rouge1'))} | {number(a['epsilon'])} | {a['seconds']:.1f} | "
            f"{a['error'] or ''} |"
        )
    return lines


def _reconstructions(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Reconstructions", ""]
    if report["redacted"]:
        lines.append("Text redacted: scores, lengths and counts only.")
    if (note := kept_snapshots_note(report)) is not None:
        lines += [f"**Kept snapshots hold training text.** {note}", ""]
    for i, a in enumerate(report["audits"]):
        if not has_text(a):
            continue
        for s in a["sentences"]:
            lines += [
                f"- audit {i}, ROUGE-1 {s['rouge1']:.2f}",
                f"  - reference:      `{a['references'][s['reference']]}`",
                f"  - reconstruction: `{a['reconstructions'][s['reconstruction']]}`",
            ]
    return lines
