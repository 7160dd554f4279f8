"""An attack that attacked nothing is reported as not attacked, never as a score of 0."""

from __future__ import annotations

import pytest

from gradaudit import assert_no_leakage, audit_batch


def test_a_rank_limited_module_is_not_attacked_and_has_no_scores(tiny_model, tiny_tokenizer):
    # The last layer's query of a classifier: only [CLS] reaches the head (rank 1).
    result = audit_batch(
        tiny_model, tiny_tokenizer, ["the movie was good", "a boring plot"], [1, 0],
        "query@1", "span",
    )  # fmt: skip
    assert result.error.startswith("not attacked:") and "[CLS]" in result.error
    assert result.rouge1 is None and result.exact is None
    assert result.references == ["the movie was good", "a boring plot"]
    with pytest.raises(AssertionError, match="not attacked"):
        assert_no_leakage(result, max_rouge1=0.3)


def test_an_attacked_module_keeps_its_scores(tiny_model, tiny_tokenizer):
    result = audit_batch(tiny_model, tiny_tokenizer, ["the movie was good"], [1], "query@0", "span")
    assert result.error is None and result.rouge1 == 1.0
