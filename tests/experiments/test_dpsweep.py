import json
import math

import pytest
from conftest import WORDS, make_tiny_model

from gradaudit import GradAuditError
from gradaudit.attacks import attack_names
from gradaudit.cli.main import main
from gradaudit.experiments.data import Examples
from gradaudit.experiments.dpsweep import SweepSettings, run_dpsweep


def _examples(n: int) -> Examples:
    texts = [" ".join(WORDS[(7 * i + 3 * k) % len(WORDS)] for k in range(4)) for i in range(n)]
    return Examples(texts, [i % 2 for i in range(n)], "synthetic")


def test_large_sigma_lowers_the_attacks_rouge(tokenizer):
    if "span" not in attack_names():
        pytest.skip("the span attack is not registered yet")
    model = make_tiny_model(tokenizer.vocab_size)
    settings = SweepSettings(
        modules=["query@0"], sigmas=[0.0, 10.0], attacks=["span"], batch_size=2, batches=1
    )
    rows = run_dpsweep(model, tokenizer, _examples(4), settings).rows
    assert rows[0].sigma == 0.0 and rows[0].epsilon == math.inf
    assert rows[0].rouge1 > 0.9 and rows[0].unattacked == 0
    # At σ = 10 the noise saturates the gradient: span cannot use it, and says so instead of
    # scoring a blank guess (which would read as "no leakage").
    assert rows[1].rouge1 is None and rows[1].unattacked == 1


def test_bad_sweep_settings_fail_before_any_compute():
    for bad, match in (
        ({"sigmas": [0.1, -1.0]}, "σ ≥ 0"),
        ({"clip": 0.0}, "positive"),
        ({"delta": 2.0}, "outside"),
        ({"attacks": ["nope"]}, "unknown attack"),
    ):
        with pytest.raises(GradAuditError, match=match):
            SweepSettings(**{"modules": ["query@0"], "attacks": ["gradmatch"], **bad}).check()


def test_dpsweep_command_end_to_end(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    make_tiny_model(tokenizer.vocab_size).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.tsv"
    ex = _examples(24)
    data.write_text(
        "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(ex.texts, ex.labels))
    )
    out = tmp_path / "out"
    args = ["dpsweep", "--model", str(model_dir), "--data", str(data), "--modules", "query@0"]
    args += ["--sigmas", "0,1", "--clip", "1.0", "--sample-rate", "0.2", "--steps", "20"]
    args += ["--attacks", "gradmatch", "--attack-budget", "gradmatch=0.005", "--batches", "1"]
    args += ["--utility", "2", "--eval-size", "8", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "| σ | ε |" in capsys.readouterr().out
    report = json.loads((out / "dpsweep.json").read_text())
    assert [r["sigma"] for r in report["rows"]] == [0.0, 1.0]
    one = report["rows"][1]
    assert 0 < one["epsilon"] < math.inf and 0 <= one["accuracy"] <= 1
    assert one["utility_epsilon"] > 0 and report["dataset_size"] == 16
    assert report["privacy"]["1.0"]["delta"] == pytest.approx(1 / 16)
    assert [a["gradient"] for a in report["audits"]] == ["clipped", "noised"]
    assert (out / "dpsweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "RDP accountant" in (out / "dpsweep.md").read_text()
    assert main([*args, "--clip", "-1"]) == 2
