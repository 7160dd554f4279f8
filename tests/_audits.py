"""Hand-made AuditResults for report and assertion tests: real scores of written texts."""

from __future__ import annotations

from dataclasses import asdict

from gradaudit import AuditResult
from gradaudit.scoring.metrics import score

REFERENCES = ["it 's a charming and often affecting journey .", "the plot is nothing but boring ."]


def audit_of(
    reconstructions: list[str],
    *,
    module: str = "bert.encoder.layer.0.attention.self.query",
    step: int | None = None,
    epsilon: float | None = None,
) -> AuditResult:
    """An AuditResult scoring `reconstructions` against REFERENCES with gradaudit's metrics."""
    s = score(REFERENCES, reconstructions)
    return AuditResult(
        modules=[module],
        attack="gradmatch",
        batch_size=len(REFERENCES),
        references=list(REFERENCES),
        reconstructions=list(reconstructions),
        rouge1=s.rouge1,
        rouge2=s.rouge2,
        rougeL=s.rougeL,
        token_recall=s.token_recall,
        exact=s.exact,
        batch_rouge1=s.batch_rouge1,
        seconds=1.5,
        options={"seed": 0, "budget": 1.0},
        step=step,
        sentences=[asdict(x) for x in s.sentences],
        metric_config=s.config,
        epsilon=epsilon,
    )


# Word salad (low), shuffled words (high ROUGE-1, low ROUGE-2) and a verbatim copy (exact).
LOW = ["music the slow movie .", "never help card bank ."]
SHUFFLED = ["journey it 's charming a and affecting often .", "boring is nothing the but plot ."]
EXACT = list(REFERENCES)
# Every word of the batch, but half of each sentence's words in the other sentence.
SCRAMBLED = ["it 's a charming nothing but boring .", "the plot is and often affecting journey ."]
