"""`gradaudit demo` end to end at CI size, and the canary exposure it reports."""

import argparse
import json

from gradaudit.integrations.demo import canary_rows, print_unfinished
from gradaudit.integrations.demo_data import CANARIES, MESSAGES

from gradaudit.cli.main import main


def test_canaries_are_substrings_of_their_messages():
    texts = {t for t, _ in MESSAGES}
    for message, secret in CANARIES.items():
        assert message in texts
        assert all(word in message for word in secret.split())


def test_canary_rows_measure_the_secret_share_in_the_matched_reconstruction():
    message = next(iter(CANARIES))
    secret_words = CANARIES[message].split()
    leaked = " ".join(secret_words[:2])
    decoded = message.replace(" ,", ",").replace(" .", ".")  # as the tokenizer decodes it
    audit = {
        "references": ["thanks a lot .", decoded],
        "reconstructions": [leaked, "thanks a lot ."],
        "sentences": [
            {"reference": 0, "reconstruction": 1},
            {"reference": 1, "reconstruction": 0},
        ],
    }
    (row,) = canary_rows({"audits": [audit]})
    assert row["canaries"] == 1
    assert row["exposure"] == 2 / len(secret_words)


def test_demo_fine_tunes_minilm_audits_and_prints_the_verdict(minilm, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main([
        "demo", "--steps", "4", "--audits", "1", "--modules", "value@0", "--batch-size", "1",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    verdict = printed.split("verdict:\n")[1].splitlines()[0]
    assert verdict.split(" — ")[1].startswith("value@0: ")  # one line per module
    assert f"report: {(out / 'audit' / 'report.html').resolve()}" in printed
    audits = json.loads((out / "audit" / "report.json").read_text())["audits"]
    assert len(audits) == 1 and audits[0]["error"] is None
    assert audits[0]["step"] == 1 and audits[0]["batch_size"] == 1
    # Measured 0.58-0.75: training-mode dropout perturbs the layer-0 inputs, so the exact
    # span mode (1.0 on eval-mode gradients) recovers only part of each sentence here.
    assert audits[0]["rouge1"] >= 0.5 and audits[0]["info"]["mode"] == "exact"


def test_an_attack_out_of_time_is_named_with_its_reason(capsys):
    """A timeout is no low score: the demo names the module and step and how to give it time."""
    args = argparse.Namespace(time_limit=170.0)
    config = argparse.Namespace(attack_timeout_s=57.5)
    timed_out = {
        "step": 1, "modules": ["bert.encoder.layer.1.attention.self.query"],
        "error": "attack timed out after 57.5 s: raise attack_timeout_s or lower budget",
    }  # fmt: skip
    late = {**timed_out, "step": 5, "error": "not attacked: the close timeout (close_timeout_s) "
            "passed first; its snapshot was deleted"}  # fmt: skip
    broken = {**timed_out, "step": 9, "error": "not attacked: no usable span"}
    scored = {**timed_out, "step": 2, "error": None}
    print_unfinished({"audits": [scored, timed_out, late, broken]}, config, args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "not measured:"
    assert lines[1].startswith(
        "  step 1 query@1: its attack did not finish within "
        "attack_timeout_s=58 s (--time-limit 170 s); a timeout, not a low"
    )
    assert lines[2].startswith(
        "  step 5 query@1: its attack did not finish before the demo's "
        "time limit (--time-limit 170 s); a timeout, not a low score"
    )
    assert lines[3] == "  step 9 query@1: not attacked: no usable span" and len(lines) == 4
