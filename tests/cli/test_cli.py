"""The command line end to end on a tiny model saved to a local folder."""

import json
import os
import stat

import pytest
from conftest import make_tiny_model

from gradaudit.cli.main import main

ROWS = "sentence\tlabel\nthe movie was good .\t1\na boring plot\t0\ni love the music\t1\n"


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "model"
    make_tiny_model(tiny_tokenizer.vocab_size).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text(ROWS)
    return path


def audit(model, data_file, out, *extra: str, modules: str = "query@0") -> int:
    """`gradaudit audit` on one module of `model`'s data, writing to `out`; its exit code."""
    return main([
        "audit", "--model", str(model), "--data", str(data_file), "--modules", modules,
        "--out", str(out), *extra,
    ])  # fmt: skip


def test_audit_prints_reconstructions_and_writes_private_reports(
    model_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "out"
    code = main([
        "audit", "--model", str(model_dir), "--data", str(data_file), "--modules", "query@0",
        "--attack", "gradmatch", "--budget", "0.01", "--limit", "2", "--out", str(out),
        "--show-text",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "reference:      the movie was good" in printed
    assert "reconstruction:" in printed and "ROUGE-1" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and len(report["audits"]) == 2
    assert report["audits"][0]["modules"] == ["bert.encoder.layer.0.attention.self.query"]
    assert 0.0 <= report["audits"][0]["rouge1"] <= 1.0
    for name in ("report.json", "report.md"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600


def test_audit_in_train_mode_records_the_mode_in_the_report(model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    code = audit(
        model_dir, data_file, out, "--attack", "gradmatch", "--budget", "0.01", "--limit", "1",
        "--train-mode", "--quiet",
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["train_mode"] is True
    assert report["config"]["data"] == str(data_file.resolve())
    assert report["audits"][0]["info"]["device"] == "cpu"
    assert report["audits"][0]["info"]["train_mode"] is True


@pytest.fixture
def snapshots(model_dir, tiny_tokenizer, tmp_path):
    """Two saved snapshots of value@0 for one sentence (steps 1, 2; 2 marked contrast)."""
    from transformers import AutoModelForSequenceClassification

    from gradaudit import capture, select_modules
    from gradaudit.model.batch import make_batch

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    batch = make_batch(model, tiny_tokenizer, ["a charming film"], [1])
    for step in (1, 2):
        snapshot = capture(model, batch, select_modules(model, "value@0"), step=step)
        snapshot.meta["contrast"] = step == 2  # as the auditor saves a dp_contrast snapshot
        snapshot.save(tmp_path / "snaps" / f"step-{step}")
    return tmp_path / "snaps"


def attack_snapshots(snapshots, model_dir, out) -> int:
    return main([
        "attack", str(snapshots), "--model", str(model_dir), "--attack", "span",
        "--out", str(out), "--quiet",
    ])  # fmt: skip


def test_attack_command_attacks_saved_snapshots(snapshots, model_dir, tmp_path):
    out = tmp_path / "out"
    assert attack_snapshots(snapshots, model_dir, out) == 0
    audits = json.loads((out / "report.json").read_text())["audits"]
    assert [a["step"] for a in audits] == [1, 2]
    assert all(a["reconstructions"] == ["a charming film"] for a in audits)
    assert [a["info"].get("contrast", False) for a in audits] == [False, True]


def test_scan_labels_modules_and_writes_json(model_dir, data_file, tmp_path, capsys):
    code = main([
        "scan", "--model", str(model_dir), "--data", str(data_file), "--modules", "query@0",
        "ffn_in@last", "--batch-size", "2", "--out", str(tmp_path / "scan"),
    ])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert [r["label"] for r in rows] == ["exact", "rank-limited"]
    assert "rank-limited" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(model_dir, data_file, tmp_path, capsys):
    code = main([
        "audit", "--model", str(model_dir), "--data", str(data_file), "--modules", "nope@0",
        "--out", str(tmp_path / "o"),
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradaudit: error: unknown component 'nope'") and "\n" not in err


def test_unknown_attack_option_fails_before_any_work(model_dir, data_file, tmp_path, capsys):
    code = main([
        "audit", "--model", str(model_dir), "--data", str(data_file), "--modules", "query@0",
        "--option", "stepz=3", "--out", str(tmp_path / "o"),
    ])  # fmt: skip
    assert code == 2
    assert "unknown option(s) stepz" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fail_above_exits_1_naming_the_score_only_when_a_limit_is_exceeded(
    model_dir, data_file, tmp_path, capsys
):
    common = ["--attack", "span", "--limit", "1", "--quiet"]
    assert audit(model_dir, data_file, tmp_path / "a", *common, "--fail-above", "rouge1=0.5") == 1
    assert "rouge1" in capsys.readouterr().err  # span rebuilds this sentence: ROUGE-1 1.0
    assert audit(model_dir, data_file, tmp_path / "b", *common, "--fail-above", "rouge1=1") == 0
    assert (tmp_path / "a" / "report.json").is_file()  # the report is written either way


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "batch size must be at least 1"),
        (["--limit", "0"], "number of batches must be at least 1"),
    ],
)
def test_bad_numbers_are_one_line_errors_before_the_model_loads(
    data_file, tmp_path, capsys, argv, message
):
    code = audit(tmp_path / "no-model", data_file, tmp_path / "out", *argv)
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_model_is_a_one_line_error(data_file, tmp_path, capsys):
    code = audit(tmp_path / "no-model", data_file, tmp_path / "out")
    assert code == 2
    assert "cannot load model" in capsys.readouterr().err


def test_version_and_help_show_the_version_and_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and "gradaudit 0." in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(default: minilm)" in capsys.readouterr().out


def test_audit_with_redact_prints_scores_but_no_training_text(
    model_dir, data_file, tmp_path, capsys
):
    code = audit(
        model_dir, data_file, tmp_path / "out", "--attack", "span", "--limit", "1", "--redact",
        "--show-text",
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "R1 " in printed and "ROUGE-1" in printed
    assert "movie" not in printed and "reference:" not in printed


def test_attack_over_a_folder_attacks_the_good_snapshots_and_names_the_damaged_one(
    snapshots, model_dir, tmp_path, capsys
):
    damaged = snapshots / "step-1" / "gradients.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:50])
    out = tmp_path / "out"
    assert attack_snapshots(snapshots, model_dir, out) == 1
    assert "step-1" in capsys.readouterr().err
    audits = json.loads((out / "report.json").read_text())["audits"]
    assert "damaged or incomplete" in audits[0]["error"]
    assert audits[1]["error"] is None and audits[1]["reconstructions"] == ["a charming film"]


def test_audit_of_a_causal_lm_uses_each_text_as_its_own_label(data_file, tmp_path):
    from _decoders import decoder_tokenizer, tiny_llama

    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    decoder_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    code = audit(
        folder, data_file, out, "--attack", "gradmatch", "--budget", "0.01", "--limit", "1",
        "--quiet", modules="query@1",
    )  # fmt: skip
    assert code == 0
    first = json.loads((out / "report.json").read_text())["audits"][0]
    assert first["error"] is None and first["references"][0].startswith("the movie was good")


def test_audit_prints_no_training_text_unless_asked(model_dir, data_file, tmp_path, capsys):
    code = audit(model_dir, data_file, tmp_path / "out", "--attack", "span", "--limit", "1")
    assert code == 0
    printed = capsys.readouterr().out
    assert "R1 1.00" in printed and "movie" not in printed


@pytest.mark.parametrize("attacks", [["span", "auto"], ["span,auto"]])
def test_lists_are_space_separated_and_commas_still_work(attacks):
    from gradaudit.cli.main import build_parser

    args = build_parser().parse_args(["bench", "--attacks", *attacks, "--batch-sizes", "1", "4"])
    assert args.attacks == ["span", "auto"] and args.batch_sizes == ["1", "4"]


def test_audit_prints_why_a_module_was_not_attacked(model_dir, data_file, tmp_path, capsys):
    code = audit(
        model_dir, data_file, tmp_path / "out", "--attack", "span", "--batch-size", "2",
        "--limit", "1", modules="query@1",
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "not attacked:" in printed and "NOT MEASURED — query@1" in printed


@pytest.fixture
def adapter_dir(model_dir, tmp_path, tiny_tokenizer):
    """A LoRA adapter (r = 16 on query) trained a few steps, saved as PEFT saves it."""
    from transformers import AutoModelForSequenceClassification

    from gradaudit.experiments.lora import lora_model

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    texts, labels = ["the movie was good", "a boring plot"], [1, 0]
    path = tmp_path / "adapter"
    lora_model(model, tiny_tokenizer, 16, ["query"], texts, labels).save_pretrained(path)
    return path


def test_scan_and_audit_take_a_saved_lora_adapter(model_dir, adapter_dir, data_file, tmp_path):
    code = main([
        "scan", "--model", str(model_dir), "--adapter", str(adapter_dir), "--data",
        str(data_file), "--modules", "query@0:lora_A", "--out", str(tmp_path / "scan"),
    ])  # fmt: skip
    assert code == 0
    (row,) = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert row["module"].endswith("query.lora_A.default") and row["bound"] == 16
    out = tmp_path / "audit"
    assert audit(model_dir, data_file, out, "--adapter", str(adapter_dir), "--attack", "span",
                 modules="query@0:lora_A") == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert all(a["modules"][0].endswith("query.lora_A.default") for a in report["audits"])
    assert {a["info"]["regime"] for a in report["audits"] if a["error"] is None} == {"span exact"}


def test_an_adapter_folder_without_a_peft_config_is_a_one_line_error(
    model_dir, data_file, tmp_path, capsys
):
    code = audit(model_dir, data_file, tmp_path / "o", "--adapter", str(tmp_path))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "no adapter_config.json" in err and "\n" not in err
