"""Leakage assertions for test suites: a plain AssertionError with a readable message.

Both take one `AuditResult`, several, or an audit directory holding `report.json`, and judge
the worst case over all of them: the highest score any audit reached. An audit that did not
run, or whose attack attacked nothing (`AuditResult.unattacked_reason`, e.g. span on a
saturated gradient), fails both: its scores prove nothing. Under pytest the helpers' own
frames are hidden from tracebacks (`__tracebackhide__`), so a failure shows the test's line
and this module's message, and no stored text through frame locals.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from gradaudit.errors import GradAuditError
from gradaudit.model.families import modules_label
from gradaudit.report.schema import read_report
from gradaudit.scoring.metrics import SCORE_KEYS
from gradaudit.scoring.result import AuditResult

Audits = AuditResult | Iterable[AuditResult] | str | os.PathLike
# Every score but ROUGE-L has a threshold (ROUGE-L is reported, not asserted on).
METRICS = tuple(key for key in SCORE_KEYS if key != "rougeL")


def load_audits(target: Audits) -> list[AuditResult]:
    """The audits of a result, a list of results, or an audit directory's `report.json`."""
    if isinstance(target, AuditResult):
        return [target]
    if isinstance(target, (str, os.PathLike)):
        return [AuditResult.from_dict(a) for a in read_report(target)["audits"]]
    audits = list(target)
    if not audits:
        raise GradAuditError("no audits to check: pass an AuditResult, a list or a report dir")
    for audit in audits:
        if not isinstance(audit, AuditResult):
            raise GradAuditError(
                f"expected AuditResult objects, got {type(audit).__name__}: pass the results "
                "of gradaudit.audit_batch or an audit directory"
            )
    return audits


def _thresholds(prefix: str, values: dict[str, float | None]) -> dict[str, float]:
    out = {}
    for metric, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise GradAuditError(
                f"{prefix}_{metric} must be a number in [0, 1] (scores are shares), got {value!r}"
            )
        out[metric] = float(value)
    return out


def _check_ran(function: str, audits: list[AuditResult]) -> None:
    __tracebackhide__ = True  # pytest shows the caller's line, not these helpers' internals
    for i, audit in enumerate(audits):
        why = audit.error or ("no scores" if audit.rouge1 is None else None)
        if why is None and audit.unattacked_reason is not None:
            why = f"not attacked: {audit.unattacked_reason}"
        if why is not None:
            raise AssertionError(
                f"gradaudit.{function}: audit {i + 1} of {len(audits)} did not run "
                f"({why}); an audit that did not run proves nothing\n" + _describe(audit, "rouge1")
            )


def _worst_sentence(audit: AuditResult, metric: str) -> str:
    if not audit.sentences:
        return "  (no per-sentence scores)"
    key = "rouge1" if metric in ("exact", "batch_rouge1") else metric
    s = max(audit.sentences, key=lambda s: float(s[key]))
    head = f"  most leaked sentence ({key} {float(s[key]):.3f}):"
    if audit.redacted or not audit.references:
        return f"{head} text redacted, scores only"
    return (
        f"{head}\n"
        f"    reference:      {audit.references[s['reference']]}\n"
        f"    reconstruction: {audit.reconstructions[s['reconstruction']]}"
    )


def _describe(audit: AuditResult, metric: str) -> str:
    scores = ", ".join(
        f"{m} {getattr(audit, m):.3f}" for m in METRICS if getattr(audit, m) is not None
    )
    return "\n".join(
        [
            f"  modules: {modules_label(audit.modules)}",
            f"  attack:  {audit.attack} ({audit.gradient} gradient, batch of {audit.batch_size})",
            f"  step:    {'-' if audit.step is None else audit.step}",
            f"  scores:  {scores or '-'}",
            _worst_sentence(audit, metric),
        ]
    )


def _check(function: str, target: Audits, limits: dict[str, float], upper: bool) -> None:
    __tracebackhide__ = True
    # Contrast audits attacked a gradient that was never released: they judge nothing.
    audits = [a for a in load_audits(target) if not a.contrast]
    if not audits:
        raise GradAuditError("only contrast audits to check: pass the released gradient's audits")
    _check_ran(function, audits)
    op, name = (">", "max") if upper else ("<", "min")
    failures: dict[int, list[tuple[str, str]]] = {}
    for metric, limit in limits.items():
        if any(getattr(a, metric) is None for a in audits):
            raise GradAuditError(
                f"an audit has no {metric} (a report written before gradaudit scored it): "
                f"drop the {name}_{metric} threshold or audit again"
            )
        i = max(range(len(audits)), key=lambda k: getattr(audits[k], metric))
        value = getattr(audits[i], metric)
        if (value > limit) if upper else (value < limit):
            text = f"{metric} = {value:.3f} {op} {name}_{metric} = {limit:.3f}"
            failures.setdefault(i, []).append((metric, text))
    if not failures:
        return
    what = "leakage above the threshold" if upper else "less leakage than required"
    lines = [f"gradaudit.{function}: {what} (worst case over {len(audits)} audit(s))"]
    for i, found in failures.items():
        lines.append(f"audit {i + 1} of {len(audits)}: " + "; ".join(t for _, t in found))
        lines.append(_describe(audits[i], found[0][0]))
    raise AssertionError("\n".join(lines))


def assert_no_leakage(
    result: Audits,
    *,
    max_rouge1: float | None = None,
    max_rouge2: float | None = None,
    max_token_recall: float | None = None,
    max_exact: float | None = 0,
    max_batch_rouge1: float | None = None,
) -> None:
    """Fail when any audit's score exceeds a threshold (by default: any sentence recovered exactly).

    Thresholds are shares in [0, 1]; None skips a metric. An audit that errored fails too.
    """
    __tracebackhide__ = True
    limits = _thresholds(
        "max",
        {"rouge1": max_rouge1, "rouge2": max_rouge2, "token_recall": max_token_recall,
         "exact": max_exact, "batch_rouge1": max_batch_rouge1},
    )  # fmt: skip
    _check("assert_no_leakage", result, limits, upper=True)


def assert_leaks(
    result: Audits,
    *,
    min_rouge1: float | None = None,
    min_rouge2: float | None = None,
    min_token_recall: float | None = None,
    min_exact: float | None = None,
    min_batch_rouge1: float | None = None,
) -> None:
    """Fail unless the worst-case audit reaches every given threshold (at least one needed).

    Use it to check that an audit still finds a leak it is known to find (e.g. no DP noise).
    """
    __tracebackhide__ = True
    limits = _thresholds(
        "min",
        {"rouge1": min_rouge1, "rouge2": min_rouge2, "token_recall": min_token_recall,
         "exact": min_exact, "batch_rouge1": min_batch_rouge1},
    )  # fmt: skip
    if not limits:
        raise GradAuditError("assert_leaks needs a threshold, e.g. min_rouge1=0.5")
    _check("assert_leaks", result, limits, upper=False)
