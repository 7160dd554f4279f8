"""assert_no_leakage / assert_leaks on results, lists and report directories."""

from __future__ import annotations

import pytest
from _audits import EXACT, LOW, REFERENCES, SCRAMBLED, SHUFFLED, audit_of

import gradaudit
from gradaudit import AuditResult, GradAuditError, assert_leaks, assert_no_leakage
from gradaudit.report import build_report, write_report


def test_exported_from_the_package():
    assert gradaudit.assert_no_leakage is assert_no_leakage
    assert gradaudit.assert_leaks is assert_leaks


def test_a_batch_rouge1_threshold_catches_words_not_sorted_into_sentences():
    scrambled = audit_of(SCRAMBLED)
    assert_no_leakage(scrambled, max_rouge1=0.6)
    with pytest.raises(AssertionError, match="batch_rouge1 = 1.000 > max_batch_rouge1 = 0.600"):
        assert_no_leakage(scrambled, max_rouge1=0.6, max_batch_rouge1=0.6)
    assert_leaks(scrambled, min_batch_rouge1=1.0)
    scrambled.batch_rouge1 = None  # as read from a report written before the score existed
    with pytest.raises(GradAuditError, match="has no batch_rouge1.*drop the max_batch_rouge1"):
        assert_no_leakage(scrambled, max_batch_rouge1=0.6)


def test_low_leakage_passes_and_shuffled_text_fails_with_a_full_message():
    assert_no_leakage(audit_of(LOW), max_rouge1=0.3, max_rouge2=0.1, max_token_recall=0.1)
    leaky = audit_of(SHUFFLED, module="bert.encoder.layer.2.attention.self.query", step=40)
    with pytest.raises(AssertionError) as info:
        assert_no_leakage(leaky, max_rouge1=0.3, max_rouge2=0.5)
    message = str(info.value)
    assert message.startswith("gradaudit.assert_no_leakage: leakage above the threshold")
    assert "rouge1 = 1.000 > max_rouge1 = 0.300" in message
    assert "rouge2" not in message.split("\n")[1]  # ROUGE-2 0.171 is within its threshold
    assert "modules: query@2" in message
    assert "attack:  gradmatch (raw gradient, batch of 2)" in message
    assert "step:    40" in message
    # The worst sentence: its reference and reconstruction, side by side.
    assert f"reference:      {REFERENCES[0]}" in message
    assert f"reconstruction: {SHUFFLED[0]}" in message


def test_default_fails_on_any_exact_recovery():
    assert_no_leakage(audit_of(SHUFFLED))
    with pytest.raises(AssertionError, match=r"exact = 1\.000 > max_exact = 0\.000"):
        assert_no_leakage(audit_of(EXACT))


def test_lists_are_judged_by_their_worst_case():
    audits = [audit_of(LOW, step=1), audit_of(SHUFFLED, step=2), audit_of(LOW, step=3)]
    with pytest.raises(AssertionError) as info:
        assert_no_leakage(audits, max_rouge1=0.5)
    assert "audit 2 of 3: rouge1 = 1.000" in str(info.value)
    assert_leaks(audits, min_rouge1=0.9)
    with pytest.raises(AssertionError) as info:
        assert_leaks(audits, min_rouge1=0.9, min_token_recall=0.5)
    message = str(info.value)
    assert "less leakage than required" in message
    assert "token_recall = 0.208 < min_token_recall = 0.500" in message


def test_redacted_results_keep_their_text_out_of_the_message():
    with pytest.raises(AssertionError) as info:
        assert_no_leakage(audit_of(SHUFFLED).redact(), max_rouge1=0.5)
    message = str(info.value)
    assert "text redacted, scores only" in message
    assert "journey" not in message and "boring" not in message


def test_a_failed_audit_proves_nothing():
    failed = AuditResult(modules=["m"], attack="gradmatch", batch_size=1, error="out of memory")
    with pytest.raises(AssertionError, match="did not run .out of memory."):
        assert_no_leakage([audit_of(LOW), failed], max_rouge1=1.0)


def test_report_directories(tmp_path):
    report = build_report([audit_of(LOW), audit_of(SHUFFLED)], config={}, redact=True)
    write_report(tmp_path / "run", report)
    assert_leaks(tmp_path / "run", min_rouge1=0.9)
    with pytest.raises(AssertionError, match="text redacted"):
        assert_no_leakage(str(tmp_path / "run"), max_rouge1=0.5)
    with pytest.raises(GradAuditError, match="no report.json"):
        assert_no_leakage(tmp_path / "missing")


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_thresholds_outside_unit_interval_are_rejected(bad):
    with pytest.raises(GradAuditError, match=r"max_rouge1 must be a number in \[0, 1\]"):
        assert_no_leakage(audit_of(LOW), max_rouge1=bad)
    with pytest.raises(GradAuditError, match=r"min_token_recall must be a number in \[0, 1\]"):
        assert_leaks(audit_of(LOW), min_token_recall=bad)


def test_bad_targets():
    with pytest.raises(GradAuditError, match="needs a threshold"):
        assert_leaks(audit_of(LOW))
    with pytest.raises(GradAuditError, match="no audits"):
        assert_no_leakage([])
    with pytest.raises(GradAuditError, match="expected AuditResult objects, got dict"):
        assert_no_leakage([audit_of(LOW).to_dict()])


def test_contrast_audits_are_not_judged():
    """The raw gradient behind a DP release (dp_contrast) was never released: no verdict."""
    contrast = audit_of(EXACT)
    contrast.info["contrast"] = True
    assert_no_leakage([audit_of(LOW), contrast], max_rouge1=0.3)
    with pytest.raises(GradAuditError, match="only contrast audits"):
        assert_no_leakage([contrast])
