"""The verdict in words: its level per module set, and what a low score does not prove."""

from __future__ import annotations

from _audits import EXACT, LOW, SCRAMBLED, audit_of

from gradaudit.report import build_report, write_report
from gradaudit.report.verdict import verdicts


def _report(*audits):
    return build_report(list(audits), config={})


def test_a_batch_rebuilt_word_for_word_is_high_and_counted():
    (verdict,) = verdicts(_report(audit_of(EXACT), audit_of(EXACT)))
    assert verdict.level == "HIGH"
    assert "2 of 2 audited batch(es) rebuilt word for word" in verdict.sentence


def test_the_batch_s_words_learnt_but_not_sorted_into_sentences_is_high():
    (verdict,) = verdicts(_report(audit_of(SCRAMBLED)))
    assert verdict.level == "HIGH" and "batch ROUGE-1 1.000" in verdict.sentence
    assert "words were learnt, though not all sorted into their sentences" in verdict.sentence


def test_a_low_score_says_it_is_a_lower_bound_and_what_the_spectrum_allows():
    audit = audit_of(LOW)
    audit.info = {
        "spectra": {audit.modules[0]: {"rank": 9, "width": 384}},
        "labels": {audit.modules[0]: "span"},
        "tokens": 9,
    }
    (verdict,) = verdicts(_report(audit))
    assert verdict.level == "LOW" and "not proof of safety" in verdict.sentence
    assert "rank 9 for 9 tokens" in verdict.sentence and "stronger attack" in verdict.sentence


def test_audits_that_did_not_run_are_not_measured_never_low():
    audit = audit_of(LOW)
    audit.rouge1 = audit.rouge2 = audit.exact = audit.token_recall = audit.rougeL = None
    audit.error = "not attacked: saturated"
    (verdict,) = verdicts(_report(audit))
    assert verdict.level == "NOT MEASURED" and "saturated" in verdict.sentence


def test_every_format_opens_with_the_verdict_and_states_the_levels(tmp_path):
    write_report(tmp_path, _report(audit_of(EXACT)))
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.splitlines()[2].startswith("- **HIGH** — ")
    assert "Levels: HIGH:" in markdown
    html = (tmp_path / "report.html").read_text()
    assert html.index("HIGH</strong>") < html.index("Worst case over")


def test_the_audit_table_explains_its_columns_and_names_the_device(tmp_path):
    audit = audit_of(EXACT)
    audit.info = {"device": "cpu"}
    write_report(tmp_path, _report(audit))
    html = (tmp_path / "report.html").read_text()
    assert "<td>cpu</td>" in html and "token recall: share of tokens recovered" in html


def test_low_verdict_on_a_partial_lora_gradient_says_a_stronger_attack_may_rebuild_it():
    module = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default"
    audit = {
        "modules": [module], "error": None, "rouge1": 0.2, "rouge2": 0.0, "exact": 0.0,
        "info": {
            "tokens": 85, "labels": {module: "partial"},
            "spectra": {module: {"rank": 8, "width": 384}},
        },
    }  # fmt: skip
    (verdict,) = verdicts({"summary": {module: {}}, "audits": [audit]})
    assert verdict.level == "LOW" and verdict.modules == "query@0:lora_A"
    assert "rank 8 for 85 tokens" in verdict.sentence and "stronger attack may" in verdict.sentence


def test_a_low_verdict_counts_the_attacks_that_stopped_at_their_time_limit():
    stopped, finished = audit_of(LOW), audit_of(LOW)
    stopped.info = {"out_of_time": "stopped at its 600 s limit"}
    (verdict,) = verdicts(_report(stopped, finished))
    assert verdict.level == "LOW"
    assert "1 of the attacks stopped at their time limit" in verdict.sentence
    (verdict,) = verdicts(_report(audit_of(LOW)))
    assert "time limit" not in verdict.sentence
