"""`gradaudit demo` end to end at CI size, and the canary exposure it reports."""

import json

from gradaudit.integrations.demo import canary_rows
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


def test_demo_fine_tunes_minilm_audits_and_prints_the_table(minilm, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main([
        "demo", "--steps", "4", "--audits", "1", "--modules", "value@0", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.value" in printed
    assert f"report: {(out / 'audit' / 'report.html').resolve()}" in printed
    audits = json.loads((out / "audit" / "report.json").read_text())["audits"]
    assert len(audits) == 1 and audits[0]["error"] is None
    # Measured 0.58-0.75: training-mode dropout perturbs the layer-0 inputs, so the exact
    # span mode (1.0 on eval-mode gradients) recovers only part of each sentence here.
    assert audits[0]["rouge1"] >= 0.5 and audits[0]["info"]["mode"] == "exact"
