"""The verdict in words: one line per audited module set, read from a report dict.

A high score proves leakage; a low one is only a lower bound (a stronger attack may do
better), so a low verdict says so next to what the gradient's spectrum allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradaudit.model.families import modules_label
from gradaudit.report.format import score

HIGH_ROUGE1 = 0.8
MEDIUM_ROUGE1 = 0.4
MEDIUM_ROUGE2 = 0.2
LEVELS = {
    "HIGH": (
        f"a batch rebuilt word for word, or ROUGE-1 ≥ {HIGH_ROUGE1} per sentence or of the batch's "
        "words pooled (batch ROUGE-1: the words learnt, sorted into sentences or not)"
    ),
    "MEDIUM": f"ROUGE-1 ≥ {MEDIUM_ROUGE1} or ROUGE-2 ≥ {MEDIUM_ROUGE2}",
    "LOW": "below those: what this attack rebuilt, a lower bound, not a proof of safety",
    "NOT MEASURED": "no audit of the module set ran (each one's error says why)",
}
# What a scan label says the gradient still identifies, whatever an attack recovered.
_SPAN_SAYS = {
    "exact": "its row space identifies each token at its position (layer-0 exact test)",
    "span": "its row space still spans the batch's inputs, so a stronger attack may rebuild it",
    "partial": (
        "its rank is capped below the tokens (a LoRA lora_A with r < tokens): its row space is a "
        "slice of the inputs' span, which the inputs must still span, so a stronger attack may "
        "rebuild them (partial)"
    ),
    "rank-limited": "it has too few directions to hold the batch (rank-limited)",
    "saturated": "it has full rank, so its row space says nothing about the inputs (saturated)",
    "zero": "it is zero",
}


@dataclass(frozen=True)
class Verdict:
    """The level of one module set and the sentence that says why."""

    level: str
    modules: str
    sentence: str

    def __str__(self) -> str:
        return f"{self.level} — {self.modules}: {self.sentence}"


def verdicts(report: dict[str, Any]) -> list[Verdict]:
    """One verdict per module set of the report's summary (contrast audits left out)."""
    groups: dict[str, list[dict[str, Any]]] = {key: [] for key in report["summary"]}
    for audit in report["audits"]:
        key = ", ".join(audit["modules"])
        if key in groups and not (audit.get("info") or {}).get("contrast"):
            groups[key].append(audit)
    return [_verdict(modules_label(key.split(", ")), audits) for key, audits in groups.items()]


def levels_line() -> str:
    """The levels and their thresholds, as one sentence for every rendered format."""
    return "Levels: " + "; ".join(f"{name}: {rule}" for name, rule in LEVELS.items()) + "."


def _verdict(label: str, audits: list[dict[str, Any]]) -> Verdict:
    scored = [a for a in audits if a["error"] is None and a["rouge1"] is not None]
    if not scored:
        why = audits[0]["error"] if audits else "no audit"
        return Verdict("NOT MEASURED", label, f"none of its {len(audits)} audit(s) ran ({why})")
    rebuilt = sum(1 for a in scored if a["exact"] == 1.0)
    rouge1 = max(a["rouge1"] for a in scored)
    rouge2 = max(a["rouge2"] for a in scored)
    counts = f"{rebuilt} of {len(scored)} audited batch(es) rebuilt word for word"
    unscored = len(audits) - len(scored)
    counts += f" ({unscored} more did not run)" if unscored else ""
    scores = f"worst ROUGE-1 {score(rouge1)}, ROUGE-2 {score(rouge2)}"
    pooled = [a["batch_rouge1"] for a in scored if a.get("batch_rouge1") is not None]
    if pooled and max(pooled) > rouge1:  # words found but not sorted into their sentences
        scores += f", batch ROUGE-1 {score(max(pooled))}"
    if rebuilt or rouge1 >= HIGH_ROUGE1:
        return Verdict("HIGH", label, f"{counts}; {scores}")
    if pooled and max(pooled) >= HIGH_ROUGE1:
        return Verdict(
            "HIGH",
            label,
            f"{counts}; {scores}: the batch's words were learnt, though not all sorted into "
            "their sentences",
        )
    stopped = sum(1 for a in scored if (a.get("info") or {}).get("out_of_time"))
    if stopped:  # a search cut short measured less than it could
        scores += (
            f"; {stopped} of the attacks stopped at their time limit with their best batch so "
            "far (raise deep_seconds or the budget to search longer)"
        )
    if rouge1 >= MEDIUM_ROUGE1 or rouge2 >= MEDIUM_ROUGE2:
        return Verdict("MEDIUM", label, f"{counts}; {scores}")
    return Verdict(
        "LOW", label, f"{counts}; {scores}. A lower bound, not proof of safety: {_span(scored)}"
    )


def _span(audits: list[dict[str, Any]]) -> str:
    """What the gradient's spectrum says, where the attack recorded it."""
    for audit in audits:
        info = audit.get("info") or {}
        spectra, labels = info.get("spectra") or {}, info.get("labels") or {}
        for module, spectrum in spectra.items():
            says = _SPAN_SAYS.get(labels.get(module, ""), "")
            return (
                f"the gradient has rank {spectrum['rank']} for {info.get('tokens', '?')} tokens "
                f"(width {spectrum['width']}, scan label '{labels.get(module, '?')}'): {says}"
            ).rstrip(": ")
    return "this attack recorded no spectrum; `gradaudit scan` or attack='auto' shows it"
