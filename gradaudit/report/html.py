"""`report.html`: one self-contained page (inline CSS, plots as base64 PNG, no network)."""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from html import escape
from typing import Any

from gradaudit.model.families import COMPONENTS, locate_name, modules_label
from gradaudit.report.format import dp_lines, kept_snapshots_note, number, score
from gradaudit.report.schema import has_text, report_epsilon, summarized_audits, worst_case
from gradaudit.report.verdict import levels_line, verdicts
from gradaudit.scoring.metrics import SCORE_KEYS, strip_special, words

OPEN_AUDITS = 3  # reconstructions shown expanded; the others are one click away
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: #666; font-size: 13px; margin: 0 0 18px; }
.verdict { border: 2px solid #8a8fa0; background: #f6f7fa; border-radius: 8px; padding: 14px 18px; }
.verdict .headline { font-size: 18px; margin: 0 0 10px; }
.verdicts { font-size: 17px; margin: 0 0 6px; padding-left: 20px; } .verdicts li { margin: 4px 0; }
table { border-collapse: collapse; margin: 6px 0; font-size: 14px; }
th, td { border: 1px solid #d5d5d5; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.err { color: #b00020; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 6px 0; }
dt { font-weight: 600; } dd { margin: 0; }
.figures { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
figure { margin: 8px 0 14px; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #eee; display: block; }
figcaption { color: #555; font-size: 13px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; margin: 4px 0 12px; }
.pair div { background: #fafafa; border: 1px solid #e3e3e3; border-radius: 6px; padding: 8px 10px; }
.pair .label { display: block; color: #666; font-size: 12px; margin-bottom: 2px; }
details { margin: 10px 0; } summary { cursor: pointer; margin-bottom: 6px; }
.scores { color: #555; font-size: 13px; }
mark { background: #ffd54f; border-radius: 2px; padding: 0 1px; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.note { color: #555; font-style: italic; }
"""


def _score_cell(value: float | None) -> str:
    """A table cell shaded from white (0) to red (1): darker means more text leaked."""
    if value is None:
        return '<td class="num">-</td>'
    alpha = 0.08 + 0.55 * max(0.0, min(1.0, value))
    return f'<td class="num" style="background: rgba(211, 47, 47, {alpha:.2f})">{score(value)}</td>'


def _table(head: list[str], rows: list[str]) -> str:
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def highlight(text: str, other: str) -> str:
    """`text` as HTML with the words also found in `other` (ROUGE tokens, counted) marked."""
    available = Counter(words(other))
    out = []
    for word in strip_special(text).split():
        tokens = Counter(words(word))
        if tokens and not tokens - available:
            available -= tokens
            out.append(f"<mark>{escape(word)}</mark>")
        else:
            out.append(escape(word))
    return " ".join(out)


def _verdict(report: dict[str, Any]) -> str:
    worst = worst_case(report)
    epsilon = report_epsilon(report)
    eps = "not known (no DP accounting recorded)" if epsilon is None else number(epsilon)
    rows = [
        f"<tr><td>{escape(modules_label(key.split(', ')))}</td>"
        f'<td class="num">{s["audits"]}</td><td class="num">{s["errors"]}</td>'
        + "".join(_score_cell(s.get(k)) for k in SUMMARY_KEYS)
        + "</tr>"
        for key, s in report["summary"].items()
    ]
    head = ["modules", "audits", "errors", "ROUGE-1", "ROUGE-2", "token recall", "exact",
            "batch ROUGE-1"]  # fmt: skip
    lines = "".join(
        f'<li><strong class="level">{escape(v.level)}</strong> — {escape(v.modules)}: '
        f"{escape(v.sentence)}</li>"
        for v in verdicts(report)
    )
    return (
        '<section id="verdict" class="verdict">'
        f'<ul class="verdicts">{lines}</ul><p class="scores">{escape(levels_line())}</p>'
        '<p class="headline"><strong>Worst case over '
        f"{summarized_audits(report)} audit(s):</strong> "
        f"ROUGE-1 {score(worst['rouge1'])} · ROUGE-2 {score(worst['rouge2'])} · "
        f"token recall {score(worst['token_recall'])} · exact {score(worst['exact'])} · "
        f"batch ROUGE-1 {score(worst['batch_rouge1'])} · ε {escape(eps)}</p>"
        f"{_table(head, rows)}"
        '<p class="scores">Worst (highest) score per audited module set; shading grows with '
        "the share of text recovered.</p></section>"
    )


def _assumptions(report: dict[str, Any]) -> str:
    metrics = "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in report["metric_config"].items()
    )
    privacy = report.get("privacy") or {}
    details = "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(number(v) if isinstance(v, float) else str(v))}</dd>"
        for k, v in privacy.items()
        if k != "statement" and v is not None
    )
    return (
        '<section id="assumptions"><h2>Threat model</h2>'
        f"<p>{escape(report['threat_model'])}.</p>"
        f'<h2>Metrics</h2><dl id="metric-config">{metrics}</dl>'
        '<h2>Differential privacy</h2><div id="privacy">'
        + "".join(f"<p>{escape(line)}</p>" for line in dp_lines(report))
        + (f"<details><summary>parameters</summary><dl>{details}</dl></details>" if details else "")
        + "</div></section>"
    )


def _png(data: bytes, alt: str, caption: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{encoded}">'
        f'<figcaption style="max-width: {_png_width(data)}px">{escape(caption)}</figcaption>'
        "</figure>"
    )


def _png_width(data: bytes) -> int:
    """Pixel width from a PNG header (IHDR), so a caption wraps at its image's width."""
    return int.from_bytes(data[16:20], "big")


def plots(report: dict[str, Any]) -> list[tuple[str, bytes, str]]:
    """(alt text, PNG, caption) of every plot the report's audits support."""
    from gradaudit.report.plots import heatmap, line_panels

    ran = [(i, a) for i, a in enumerate(report["audits"]) if a["error"] is None]
    if not ran:
        return []
    out = []
    by_step = all(a["step"] is not None for _, a in ran)
    xlabel = "training step" if by_step else "audit #"
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {"ROUGE-1": {}, "ROUGE-2": {}}
    for i, a in ran:
        label = modules_label(a["modules"])
        for title, key in (("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2")):
            panels[title].setdefault(label, []).append((a["step"] if by_step else i, a[key]))
    out.append(
        ("ROUGE per audited step and module", line_panels(panels, xlabel=xlabel, join=False),
         f"ROUGE-1 and ROUGE-2 F of each audited batch by {xlabel}, one marker per module set; "
         "batches are independent, so the points are not joined.")
    )  # fmt: skip
    epsilons = sorted({(a["step"], a["epsilon"]) for a in report["audits"]
                       if a["step"] is not None and a["epsilon"] is not None})  # fmt: skip
    if epsilons:
        finite = [(s, e if math.isfinite(e) else float("nan")) for s, e in epsilons]
        out.append(
            ("epsilon against step",
             line_panels({"ε spent": {"ε": finite}}, xlabel="training step", ylim=None),
             "Privacy loss ε spent up to each audited step (infinite ε, no noise, not drawn).")
        )  # fmt: skip
    cells: dict[tuple[int, str], dict[str, float]] = {}
    for _, a in ran:
        found = locate_name(a["modules"][0]) if len(a["modules"]) == 1 else None
        if found is not None:
            cell = cells.setdefault((found[1], found[0]), {"rouge1": 0.0, "rouge2": 0.0})
            for key in cell:
                cell[key] = max(cell[key], a[key])
    if len(cells) > 1:
        layers = sorted({layer for layer, _ in cells})
        components = [c for c in COMPONENTS if any(c == comp for _, comp in cells)]
        for key, name in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2")):
            matrix = [[cells.get((layer, c), {}).get(key, float("nan")) for c in components]
                      for layer in layers]  # fmt: skip
            png = heatmap(matrix, rows=[f"layer {la}" for la in layers], columns=components,
                          title=f"worst {name} per module")  # fmt: skip
            out.append(
                (f"{name} heatmap layer x component", png,
                 f"Worst {name} of single-module audits, by layer and component (blank: not "
                 "audited).")
            )  # fmt: skip
    return out


def _audit_table(report: dict[str, Any]) -> str:
    head = ["#", "step", "modules", "attack", "gradient", "B", "ROUGE-1", "ROUGE-2", "ROUGE-L",
            "token recall", "exact", "batch ROUGE-1", "ε", "seconds", "device",
            "error"]  # fmt: skip
    rows = []
    for i, a in enumerate(report["audits"]):
        rows.append(
            f'<tr id="audit-{i}"><td class="num">{i}</td>'
            f'<td class="num">{"-" if a["step"] is None else a["step"]}</td>'
            f'<td title="{escape(", ".join(a["modules"]))}">{escape(modules_label(a["modules"]))}'
            f"</td><td>{escape(a['attack'])}</td><td>{escape(a['gradient'])}</td>"
            f'<td class="num">{a["batch_size"]}</td>'
            + "".join(_score_cell(a.get(k)) for k in SCORE_KEYS)
            + f'<td class="num">{number(a["epsilon"])}</td>'
            f'<td class="num">{a["seconds"]:.1f}</td>'
            f"<td>{escape(str((a.get('info') or {}).get('device', '-')))}</td>"
            f'<td class="err">{escape(a["error"] or "")}</td></tr>'
        )
    return (
        f'<section id="audits"><h2>Audits</h2>{_table(head, rows)}'
        f'<p class="scores">{escape(COLUMNS)}</p></section>'
    )


# The worst-case columns per module set, in the order of the summary table.
SUMMARY_KEYS = ("rouge1", "rouge2", "token_recall", "exact", "batch_rouge1")
COLUMNS = (
    "step: the training step audited (- outside training); gradient: what was attacked (raw, "
    "clipped by max_grad_norm, or noised as DP-SGD releases it); B: sentences in the batch; "
    "ROUGE-1/2/L: F-measure of the reconstruction against the batch (1 = every word, in "
    "order); token recall: share of tokens recovered at their own position; exact: share of "
    "sentences rebuilt word for word; batch ROUGE-1: ROUGE-1 of the batch's words pooled over "
    "its sentences (the words learnt, sorted into sentences or not); ε: privacy spent up to "
    "that step; seconds: the attack's time on the device named; error: why an audit has no "
    "scores."
)


def _reconstructions(report: dict[str, Any]) -> str:
    parts = ['<section id="reconstructions"><h2>Reconstructions</h2>']
    if report["redacted"]:
        parts.append('<p class="note">Text redacted: scores, lengths and counts only.</p>')
    if (note := kept_snapshots_note(report)) is not None:
        parts.append(
            f'<p class="note"><b>Kept snapshots hold training text.</b> {escape(note)}</p>'
        )
    else:
        parts.append(
            '<p class="scores">Each reference beside its matched reconstruction; '
            "<mark>marked</mark> words appear in both (ROUGE tokens, counted). The "
            f"{OPEN_AUDITS} audits with the highest ROUGE-1 are open.</p>"
        )
    shown = [(i, a) for i, a in enumerate(report["audits"]) if has_text(a)]
    worst = {i for i, _ in sorted(shown, key=lambda ia: -(ia[1]["rouge1"] or 0))[:OPEN_AUDITS]}
    for i, a in shown:
        step = "" if a["step"] is None else f", step {a['step']}"
        parts.append(
            f'<details id="text-{i}"{" open" if i in worst else ""}><summary><strong>Audit {i}: '
            f"{escape(modules_label(a['modules']))}{step}, {escape(a['attack'])}</strong> — "
            f"ROUGE-1 {score(a['rouge1'])}</summary>"
        )
        for s in sorted(a["sentences"], key=lambda s: -s["rouge1"]):
            ref, rec = a["references"][s["reference"]], a["reconstructions"][s["reconstruction"]]
            parts.append(
                f'<div class="pair"><div><span class="label">reference {s["reference"]}</span>'
                f"{highlight(ref, rec)}</div>"
                f'<div><span class="label">reconstruction — ROUGE-1 {s["rouge1"]:.2f}, ROUGE-2 '
                f"{s['rouge2']:.2f}, token recall {s['token_recall']:.2f}</span>"
                f"{highlight(rec, ref)}</div></div>"
            )
        parts.append("</details>")
    parts.append("</section>")
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML page that needs nothing but a browser."""
    figures = "".join(_png(png, alt, caption) for alt, png, caption in plots(report))
    meta = (
        f"created {report.get('created', '-')} · gradaudit {report.get('gradaudit_version', '-')}"
        f" · schema {report['schema_version']}" + (" · text redacted" if report["redacted"] else "")
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>gradaudit leakage report</title><style>{STYLE}</style></head><body>"
        f'<h1>gradaudit leakage report</h1><p class="meta">{escape(meta)}</p>'
        + _verdict(report)
        + _assumptions(report)
        + '<section id="plots"><h2>Plots</h2><div class="figures">'
        + (figures or '<p class="note">No audit ran, so there is nothing to plot.</p>')
        + "</div></section>"
        + _audit_table(report)
        + _reconstructions(report)
        + '<section id="config"><h2>Configuration</h2><pre>'
        + escape(json.dumps(report["config"], indent=2, ensure_ascii=False))
        + "</pre></section></body></html>\n"
    )
