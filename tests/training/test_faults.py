"""The core Auditor under bad settings, shared folders and the state a killed run leaves."""

from __future__ import annotations

import json
import math
import stat

import pytest
import torch
from _tiny import read_audits, tiny_config
from conftest import make_tiny_model
from test_auditor import train

from gradaudit import AuditConfig, Auditor, GradAuditError
from gradaudit.training.results import PENDING

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"every_n_steps": "5"}, r"every_n_steps must be a whole number \(without quotes\)"),
        ({"every_n_steps": 2.5}, "every_n_steps must be a whole number, got 2.5"),
        ({"every_n_steps": True}, "every_n_steps must be a whole number"),
        ({"steps": [1, 2.5]}, "each of steps must be a whole number"),
        ({"attack_timeout_s": math.nan}, "attack_timeout_s must be a finite number"),
        ({"close_timeout_s": math.inf}, "close_timeout_s must be a finite number"),
        ({"start_timeout_s": 0}, "start_timeout_s must be > 0"),
        ({"budget": math.nan}, "budget must be a finite number"),
        ({"probability": "0.5"}, "probability must be a number"),
        ({"background": "yes"}, "background must be true or false"),
        ({"attack": "span", "attack_options": {"min_gap": "x"}}, "option min_gap .* a number"),
        ({"attack": "span", "attack_options": {"chunk": 0.5}}, "option chunk .* whole number"),
        ({"attack": "span", "attack_options": {"saturated": "x"}}, "saturated='x': choose"),
        ({"attack_options": ["steps", 5]}, "attack_options must be a mapping"),
    ],
)
def test_bad_settings_are_one_clear_error_at_construction(settings, message):
    """Defect 8: "5" raised a raw TypeError, 2.5 and NaN were accepted, bad attack options
    failed every audit later instead."""
    with pytest.raises(GradAuditError, match=message):
        AuditConfig(**settings)


def test_a_missing_device_is_refused_at_construction():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(GradAuditError, match="device 'cuda': this machine has 0 CUDA device"):
        AuditConfig(device="cuda")
    assert AuditConfig(device="cpu").device == "cpu"


def test_output_folder_and_snapshots_are_private(tokenizer, tmp_path):
    """Defect 8: snapshots/ was created 0755 and an existing output folder stayed 0755."""
    out = tmp_path / "shared"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    model = make_tiny_model(tokenizer.vocab_size).train()
    train(model, tokenizer, tiny_config(out, steps=[1], attack=None), steps=1)
    for folder in (out, out / "snapshots", out / "snapshots" / "step-00000001"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((out / "report.json").stat().st_mode) == 0o600


def test_resumed_run_settles_what_a_killed_run_left(tokenizer, tmp_path):
    """Defect 3: a run killed with its worker leaves step 4 pending (and its snapshot); step 1
    is missing (say a full disk kept its entry from the report). Resumed at step 5, step 1 is
    listed as lost, step 4 as not attacked, and step 4's snapshot is deleted."""
    config = tiny_config(tmp_path, steps=[1, 4], attack=None)
    train(make_tiny_model(tokenizer.vocab_size).train(), tokenizer, config, steps=5)
    report = json.loads((tmp_path / "report.json").read_text())
    step1, step4 = report["audits"]
    step4["error"] = PENDING  # what the report holds between capture and outcome
    report["audits"] = [step4]
    (tmp_path / "report.json").write_text(json.dumps(report))
    snapshot = tmp_path / "snapshots" / "step-00000004"
    assert snapshot.is_dir()

    model = make_tiny_model(tokenizer.vocab_size).train()
    auditor = Auditor(model, tiny_config(tmp_path, steps=[1, 4], attack=None))
    auditor.load_state_dict({"step": 5, "audited_steps": [1, 4]})
    auditor.close()
    audits = read_audits(tmp_path)
    assert [a["step"] for a in audits] == [1, 4]
    assert audits[0]["error"].startswith("lost: an earlier run counted step 1 as audited")
    assert audits[1]["error"].startswith("not attacked: the run that took it ended before")
    assert "its snapshot was deleted" in audits[1]["error"] and not snapshot.exists()
