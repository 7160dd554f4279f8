"""The pytest plugin end to end: generated tests audit a tiny random BERT with gradmatch."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = '''
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

WORDS = sorted(set("""the a and not very movie film story plot actor good bad great boring
charming funny sad long slow fast cast script ending is was it this with of in to love hate
music dark bright never always""".split()))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]))
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval(), tokenizer
'''

TESTS = """
import pytest
import gradaudit

TEXTS = ["the movie was very good and charming", "a boring film with a slow plot"]


@pytest.mark.gradaudit
def test_within_bounds(tiny, gradaudit_audit):
    model, tokenizer = tiny
    result = gradaudit_audit(model, tokenizer, TEXTS, [1, 0], "query@0")
    assert result.attack == "gradmatch" and result.options["budget"] == 0.002
    gradaudit.assert_no_leakage(result, max_rouge1=1.0, max_exact=1.0)


@pytest.mark.gradaudit
def test_demands_full_recovery(tiny, gradaudit_audit):
    model, tokenizer = tiny
    result = gradaudit_audit(model, tokenizer, TEXTS, [1, 0], "query@0", seed=1)
    gradaudit.assert_leaks(result, min_rouge1=1.0, min_token_recall=1.0)
"""


def test_generated_tests_pass_and_fail_with_the_leakage_message(pytester: pytest.Pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_leak=TESTS)
    result = pytester.runpytest(
        "--strict-markers",  # the gradaudit marker must be registered
        "--gradaudit-budget=0.002",
        "--gradaudit-device=cpu",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: gradaudit.assert_leaks: less leakage than required*",
            "*audit 1 of 1: rouge1 = * < min_rouge1 = 1.000*",
            "*modules: query@0",
            "*attack:  gradmatch (raw gradient, batch of 2)",
            "*step:    -",
            "*most leaked sentence (rouge1 *):",
            "*reference:      *",
            "*reconstruction: *",
        ]
    )
    assert "def _check(" not in result.stdout.str()  # helper frames hidden from the traceback


def test_options_and_marker_are_registered(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        ["*gradaudit leakage audits*", "*--gradaudit-device*", "*--gradaudit-budget*",
         "*--gradaudit-attack*"]
    )  # fmt: skip
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gradaudit: a gradient-leakage audit*"])
