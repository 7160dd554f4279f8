"""Faults injected for real into Trainer runs: killed and interrupted processes, a worker that
hangs, a raising callback, a full disk, a compute_loss without labels, bf16.

For each: training finishes (or raises only its own exception), the process exits within the
configured bounds, every audited step is in report.json with a score or a named error, and no
snapshot is left unless kept on purpose.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _faults import alive, fault_model, wait_for, write_child
from _tiny import TinyTexts, read_audits, tiny_config
from conftest import make_tiny_model
from gradaudit.integrations.trainer import GradAuditCallback
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import gradaudit.io
from gradaudit import assert_no_leakage
from gradaudit.training.worker import WORKER_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trainer_for(tokenizer, out: Path, config, model=None, trainer_class=Trainer, **args):
    settings = {
        "per_device_train_batch_size": 4, "max_steps": 6, "learning_rate": 1e-3,
        "save_strategy": "no", "report_to": [], "use_cpu": True, "disable_tqdm": True,
        "seed": 0, **args,
    }  # fmt: skip
    trainer = trainer_class(
        model=model or make_tiny_model(tokenizer.vocab_size),
        args=TrainingArguments(str(out / "trainer"), **settings),
        train_dataset=TinyTexts(tokenizer, 64),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.add_callback(GradAuditCallback(config, trainer=trainer))
    return trainer


def snapshots_left(out: Path) -> list[Path]:
    return sorted((out / "snapshots").glob("*")) if (out / "snapshots").is_dir() else []


# -- a killed or interrupted training process (a real child process, real signals) ----------


class Child:
    """`_faults.run_child` in a process (and session) of its own; its output in a file."""

    def __init__(self, folder: Path, mode: str) -> None:
        self.folder = folder
        self.log = folder / "output.txt"
        # Ctrl-C as a terminal delivers it: in the full suite the test process has SIGINT
        # ignored (set by some earlier test or library), and a child inheriting that never saw
        # the `hang` run's Ctrl-C (its log showed the disposition SIG_IGN).
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                write_child(folder, mode), stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )  # fmt: skip

    def says(self, text: str) -> bool:
        return text in self.log.read_text()

    def wait_for(self, text: str, timeout_s: float = 90) -> None:
        wait_for(lambda: self.says(text) or self.process.poll() is not None, timeout_s, text)
        assert self.says(text), self.log.read_text()[-3000:]

    def worker_pid(self) -> int:
        marker = self.folder / "worker.pid"
        wait_for(lambda: marker.is_file() and marker.read_text(), 60, "the worker's start")
        return int(marker.read_text())

    def kill_all(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def child(tmp_path):
    children = []

    def start(mode: str) -> Child:
        children.append(Child(tmp_path, mode))
        return children[-1]

    yield start
    for started in children:
        started.kill_all()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_training_leaves_no_worker_and_its_resumed_run_keeps_its_audits(
    child, tokenizer, tmp_path, sig
):
    """Defects 2 and 3: killed while an attack ran, the training process left its worker
    alive (parent PID 1) and snapshots on disk; the run resumed from checkpoint-5 counted
    steps 1 and 4 as audited but its report omitted them."""
    run = child("block")
    run.wait_for("closing")  # training done, close() waits for the blocked attack of step 1
    worker = run.worker_pid()  # the attack runs in it
    assert alive(worker)
    run.process.send_signal(sig)
    assert run.process.wait(timeout=30) == -sig
    assert wait_for(lambda: not alive(worker), 10, "the worker's exit") < 5
    out = tmp_path / "audit"
    audits = read_audits(out)
    assert [a["step"] for a in audits] == [1, 4, 7]
    for audit in audits:  # settled by the worker before it exited
        assert audit["error"].startswith("not attacked: the training process died")
        assert "snapshot was deleted" in audit["error"]
    assert snapshots_left(out) == []
    resumed = trainer_for(tokenizer, tmp_path, tiny_config(out, every_n_steps=3), max_steps=9)
    resumed.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-5"))
    again = read_audits(out)
    assert [a["step"] for a in again] == [1, 4, 7] and again[:2] == audits[:2]
    assert again[2]["error"] is None and again[2]["rouge1"] is not None  # taken again
    assert snapshots_left(out) == []


@pytest.mark.parametrize("mode", ["raise", "hang", "raise-zero-arg"])
def test_training_that_raises_or_is_interrupted_still_reports_and_stops_the_worker(
    child, tmp_path, mode
):
    """Defects 1 and 3: a callback raising at step 7, or Ctrl-C while close() waits for a
    worker that hangs building its model: the exit handler kills the worker, records every
    audit and deletes their snapshots. The same with the callback class handed to the
    Trainer, its settings from the environment (issue 27)."""
    run = child(mode)
    if mode == "hang":
        run.wait_for("closing")
        run.worker_pid()  # hanging in the model build
        run.process.send_signal(signal.SIGINT)
    else:
        run.wait_for("step 7")
    start = time.monotonic()
    # Python dies of SIGINT after an uncaught KeyboardInterrupt (its exit handlers ran first)
    raised = mode.startswith("raise")
    assert run.process.wait(timeout=60) == (1 if raised else -signal.SIGINT)
    assert time.monotonic() - start < 10
    last = run.log.read_text().strip().splitlines()[-1]  # training's own exception, and only it
    assert last == ("RuntimeError: callback failed at step 7" if raised else "KeyboardInterrupt")
    assert not alive(run.worker_pid())
    audits = read_audits(tmp_path / "audit")
    assert [a["step"] for a in audits] == [1, 4, 7]
    for audit in audits:
        assert audit["error"].startswith("not attacked: the auditor was not closed")
    assert snapshots_left(tmp_path / "audit") == []


# -- in-process faults ------------------------------------------------------------------


def test_worker_that_hangs_at_start_is_bounded(tokenizer, tmp_path):
    """Defect 1: no timeout applied before the worker was ready; close() joined forever.

    (2 s end the start before the model is built here; the hang in the model build itself is
    the `hang` and `raise` runs above.)
    """
    model = fault_model(tokenizer.vocab_size, build_sleep_s=600)
    config = tiny_config(tmp_path / "audit", every_n_steps=3, background=True)
    config.start_timeout_s = 2.0
    start = time.monotonic()
    trainer_for(tokenizer, tmp_path, config, model=model).train()
    assert time.monotonic() - start < 2.0 + 15  # the start bound, spawning and training
    assert [p for p in multiprocessing.active_children() if p.name == WORKER_NAME] == []
    audits = read_audits(tmp_path / "audit")
    assert [a["step"] for a in audits] == [1, 4]
    for audit in audits:  # the second does not wait again
        assert "not ready within start_timeout_s=2 s" in audit["error"]


def full_disk(monkeypatch, too_big: int = 0, names: tuple[str, ...] = ()) -> list[Path]:
    """Make writes of files above `too_big` bytes (or named `names`) fail with ENOSPC, as a
    nearly full disk does; the paths refused."""
    refused = []
    write = gradaudit.io._write_file

    def nearly_full(path: Path, fd: int, data: bytes) -> None:
        if (too_big and len(data) > too_big) or path.name in names:
            refused.append(path)
            os.close(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, fd, data)

    monkeypatch.setattr(gradaudit.io, "_write_file", nearly_full)
    return refused


@pytest.mark.parametrize("background", [False, True])
def test_full_disk_is_a_named_error_with_no_partial_snapshot(
    tokenizer, tmp_path, monkeypatch, background
):
    """Defect 4: a nearly full disk took the gradients, refused the weights; the error had
    no path and no fix, and the partial snapshot folder stayed."""
    refused = full_disk(monkeypatch, too_big=100_000)
    config = tiny_config(tmp_path / "audit", every_n_steps=3, background=background)
    trainer_for(tokenizer, tmp_path, config).train()
    assert {p.name for p in refused} == {"weights.safetensors"}
    audits = read_audits(tmp_path / "audit")
    assert [a["step"] for a in audits] == [1, 4]
    for audit in audits:
        error = audit["error"]
        assert "No space left on device (errno 28)" in error and "free space" in error
        assert f"snapshots/step-0000000{audit['step']}" in error
    assert snapshots_left(tmp_path / "audit") == []


@pytest.mark.parametrize("background", [False, True])
def test_report_write_failure_never_reaches_training(tokenizer, tmp_path, monkeypatch, background):
    """Defect 4: with the disk full for reports, training crashed at step 1 (background off)
    or train() raised from on_train_end and audits vanished (background on)."""
    refused = full_disk(monkeypatch, names=("report.json",))
    attack = None if background else "gradmatch"  # no worker to spawn: the writer thread
    config = tiny_config(tmp_path / "audit", every_n_steps=3, background=background, attack=attack)
    trainer = trainer_for(tokenizer, tmp_path, config)
    with pytest.warns(RuntimeWarning, match="could not write the report: No space left.*free"):
        trainer.train()
    assert trainer.state.global_step == 6 and refused
    assert not (tmp_path / "audit" / "report.json").exists()
    monkeypatch.undo()  # the disk has room again: the report holds every audit
    callback = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "auditor"))
    assert callback.auditor.close() == tmp_path / "audit" / "report.json"
    audits = read_audits(tmp_path / "audit")
    assert [a["step"] for a in audits] == [1, 4]
    for audit in audits:
        assert audit["error"] is None if attack else audit["error"].startswith("not attacked")


class PoppingTrainer(Trainer):
    """A custom compute_loss that pops the labels before calling the model."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = outputs.logits.log_softmax(-1).gather(1, labels[:, None]).mean().neg()
        return (loss, outputs) if return_outputs else loss


def test_compute_loss_that_pops_labels_does_not_break_training(tokenizer, tmp_path):
    """Defect 8: training crashed at step 1 with "batch lacks labels" and no fix."""
    config = tiny_config(tmp_path / "audit", every_n_steps=3)
    trainer = trainer_for(tokenizer, tmp_path, config, trainer_class=PoppingTrainer)
    with pytest.warns(RuntimeWarning, match="batch lacks labels"):
        trainer.train()
    assert trainer.state.global_step == 6
    audits = read_audits(tmp_path / "audit")
    assert [a["step"] for a in audits] == [1, 4]
    for audit in audits:
        assert (
            "lacks labels" in audit["error"] and "model(**inputs, labels=labels)" in audit["error"]
        )


def test_bf16_audits_record_their_precision_and_never_read_as_safe(tokenizer, tmp_path):
    """Defect 5: under bf16 every span audit was "saturated" (its rank read at float32's
    rounding) with ROUGE-1 0.0, error None, and assert_no_leakage passed."""
    span = tiny_config(tmp_path / "span", every_n_steps=3, attack="span")
    trainer_for(tokenizer, tmp_path, span, bf16=True).train()
    audits = read_audits(tmp_path / "span")
    assert [a["step"] for a in audits] == [1, 4]
    for audit in audits:
        assert audit["info"]["precision"] == "bfloat16"
        (spectrum,) = audit["info"]["spectra"].values()
        assert spectrum["precision"] == "bfloat16" and spectrum["relative_floor"] == 2**-7
        assert audit["error"].startswith("not attacked: ") and audit["rouge1"] is None
    with pytest.raises(AssertionError, match="did not run .not attacked"):
        assert_no_leakage(tmp_path / "span", max_rouge1=0.3)
    auto = tiny_config(tmp_path / "auto", steps=[1], attack="auto")  # gradmatch attacks it
    trainer_for(tokenizer, tmp_path, auto, bf16=True, max_steps=1).train()
    (audit,) = read_audits(tmp_path / "auto")
    assert audit["error"] is None and audit["rouge1"] is not None
    assert audit["info"]["precision"] == "bfloat16"
