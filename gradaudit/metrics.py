"""`gradaudit.metrics`: the documented import path of the leakage metrics.

They live in `gradaudit.scoring.metrics`; this keeps `from gradaudit.metrics import score`
working.
"""

from gradaudit.scoring.metrics import (
    METRIC_CONFIG,
    SCORE_KEYS,
    Scores,
    SentenceScore,
    canary_exposure,
    score,
    strip_special,
    words,
)

__all__ = [
    "METRIC_CONFIG",
    "SCORE_KEYS",
    "Scores",
    "SentenceScore",
    "canary_exposure",
    "score",
    "strip_special",
    "words",
]
