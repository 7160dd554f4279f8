"""Leakage metrics: ROUGE from rouge-score, Hungarian matching, token recall, exact share.

One configuration, `METRIC_CONFIG`, is written into every result so scores are comparable.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rouge_score import rouge_scorer, tokenizers
from scipy.optimize import linear_sum_assignment

from gradaudit.errors import GradAuditError

# The scores of a result, in the order every table and log lists them.
SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "token_recall", "exact", "batch_rouge1")
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "<s>", "</s>", "<pad>", "<mask>")
METRIC_CONFIG: dict[str, Any] = {
    "rouge": "rouge-score F-measure, use_stemmer=False, default tokenizer (lowercase, alnum)",
    "matching": "Hungarian assignment of reconstructions to references on 1 - ROUGE-1 F (B > 1)",
    "special_tokens": "stripped from references and reconstructions before scoring",
    "token_recall": "share of reference token ids recovered at their own position",
    "exact": "share of sentences whose ROUGE tokens equal the reference's",
    "batch_rouge1": (
        "ROUGE-1 F of the batch's words pooled over its sentences (order and sentence "
        "boundaries ignored): the words learnt, sorted into sentences or not"
    ),
    "aggregate": "mean over sentences",
}
_SPECIAL = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)
_SCORER = rouge_scorer.RougeScorer(
    ["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=_TOKENIZER
)


def strip_special(text: str) -> str:
    return " ".join(_SPECIAL.sub(" ", text).split())


@dataclass
class SentenceScore:
    reference: int
    reconstruction: int
    rouge1: float
    rouge2: float
    rougeL: float
    token_recall: float
    exact: bool


@dataclass
class Scores:
    """Mean scores over sentences, with the per-sentence matching behind them."""

    rouge1: float
    rouge2: float
    rougeL: float
    token_recall: float
    exact: float
    batch_rouge1: float
    sentences: list[SentenceScore] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=lambda: dict(METRIC_CONFIG))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _token_recall(reference: Sequence[int], reconstruction: Sequence[int]) -> float:
    if not reference:
        return 1.0
    hits = sum(r == c for r, c in zip(reference, reconstruction))
    return hits / len(reference)


def score(
    references: Sequence[str],
    reconstructions: Sequence[str],
    *,
    reference_ids: Sequence[Sequence[int]] | None = None,
    reconstruction_ids: Sequence[Sequence[int]] | None = None,
) -> Scores:
    """Score reconstructions against references (see `METRIC_CONFIG`).

    `*_ids` are the content token ids per sentence (special tokens removed, in position
    order); without them token recall compares ROUGE tokens position by position.
    """
    if len(references) != len(reconstructions):
        raise GradAuditError(
            f"{len(references)} references but {len(reconstructions)} reconstructions: "
            "score one reconstruction per reference"
        )
    if not references:
        raise GradAuditError("nothing to score: pass at least one reference")
    refs = [strip_special(t) for t in references]
    recs = [strip_special(t) for t in reconstructions]
    pair = [[_SCORER.score(r, c) for c in recs] for r in refs]
    cost = np.array([[1.0 - s["rouge1"].fmeasure for s in row] for row in pair])
    ref_idx, rec_idx = linear_sum_assignment(cost)
    if reference_ids is None or reconstruction_ids is None:
        reference_ids = [_TOKENIZER.tokenize(r) for r in refs]
        reconstruction_ids = [_TOKENIZER.tokenize(c) for c in recs]
    sentences = []
    for i, j in zip(ref_idx, rec_idx):
        s = pair[i][j]
        sentences.append(
            SentenceScore(
                reference=int(i),
                reconstruction=int(j),
                rouge1=float(s["rouge1"].fmeasure),
                rouge2=float(s["rouge2"].fmeasure),
                rougeL=float(s["rougeL"].fmeasure),
                token_recall=_token_recall(reference_ids[i], reconstruction_ids[j]),
                exact=_TOKENIZER.tokenize(refs[i]) == _TOKENIZER.tokenize(recs[j]),
            )
        )

    def mean(key: str) -> float:
        return float(np.mean([getattr(s, key) for s in sentences]))

    return Scores(
        rouge1=mean("rouge1"),
        rouge2=mean("rouge2"),
        rougeL=mean("rougeL"),
        token_recall=mean("token_recall"),
        exact=mean("exact"),
        batch_rouge1=float(_SCORER.score(" ".join(refs), " ".join(recs))["rouge1"].fmeasure),
        sentences=sentences,
    )


def words(text: str) -> list[str]:
    """The words ROUGE compares: special tokens stripped, lowercased, alphanumeric."""
    return _TOKENIZER.tokenize(strip_special(text))


def canary_exposure(secret: str, reconstruction: str) -> float:
    """Share of a planted secret's words (a multiset) found in one reconstruction."""
    wanted = Counter(words(secret))
    if not wanted:
        raise GradAuditError("a canary secret needs at least one word")
    found = Counter(words(reconstruction))
    return sum((wanted & found).values()) / sum(wanted.values())
