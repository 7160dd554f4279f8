"""Faults injected for real into training runs and the spawned attack worker.

The worker unpickles its model class, `FaultBert`, and so imports this module: the attack
registered below then exists there too. `run_child` is the training script that the signal
tests start as a process of its own (written to tmp_path by `write_child`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import BertForSequenceClassification, TrainerCallback

from gradaudit.attacks.base import Attack
from gradaudit.attacks.registry import register_attack

TESTS = Path(__file__).resolve().parents[1]


class FaultBert(BertForSequenceClassification):
    """A tiny BERT whose construction writes its process id to `config.build_marker` and
    then sleeps `config.build_sleep_s` (the worker builds its model from the config)."""

    def __init__(self, config) -> None:
        marker = getattr(config, "build_marker", None)
        if marker:
            Path(marker).write_text(str(os.getpid()))
        time.sleep(getattr(config, "build_sleep_s", 0))
        super().__init__(config)


def fault_model(vocab_size: int, **faults) -> FaultBert:
    """`conftest.make_tiny_model`'s BERT as a FaultBert; `faults` apply to later builds."""
    from conftest import make_tiny_model

    model = FaultBert(make_tiny_model(vocab_size).config).eval()
    for key, value in faults.items():
        setattr(model.config, key, value)
    return model


@dataclass
class BlockingOptions:
    marker: str = ""
    seconds: float = 600.0


class BlockingAttack(Attack):
    """Writes its process id to `marker`, then blocks for `seconds`: an attack caught running."""

    name = "blocking"
    Options = BlockingOptions

    def _reconstruct(self, model, snapshot, **kwargs):
        Path(self.options.marker).write_text(str(os.getpid()))
        time.sleep(self.options.seconds)
        raise RuntimeError("the blocking attack woke up")


register_attack("blocking", BlockingAttack)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody reaped yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Poll `condition()` until true; the seconds it took (fails after `timeout_s`)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - start


class Announce(TrainerCallback):
    """Prints each finished step, "closing" after the last one (the auditor, which runs
    first of the Trainer's callbacks, closes next); at `fail_at`, once `marker` exists (the
    worker hangs building its model), raises."""

    def __init__(self, fail_at: int | None = None, marker: Path | None = None) -> None:
        self.fail_at = fail_at
        self.marker = marker

    def on_step_end(self, args, state, control, **kwargs):
        failing = state.global_step == self.fail_at
        if failing:
            wait_for(self.marker.is_file, 60, "the worker's model build")
        print(f"step {state.global_step}", flush=True)
        if failing:
            raise RuntimeError(f"callback failed at step {state.global_step}")
        if state.global_step == state.max_steps:
            print("closing", flush=True)


def run_child(out: str, mode: str) -> None:
    """A real Trainer run of 9 steps, audits at 1, 4 and 7 in the background, checkpoint at 5.

    "block": the attack of step 1 blocks in the worker, so close() waits (for a kill).
    "hang": the worker hangs building its model, so close() waits (for a Ctrl-C).
    "raise": the worker hangs building its model, and a callback raises at step 7.
    A "-zero-arg" suffix hands the Trainer the callback class, the settings coming from
    GRADAUDIT_CONFIG and GRADAUDIT_OUTPUT_DIR, as transformers users add callbacks.
    """
    zero_arg = mode.endswith("-zero-arg")
    mode = mode.removesuffix("-zero-arg")
    import torch
    from _tiny import TinyTexts
    from conftest import make_tiny_tokenizer
    from gradaudit.integrations.trainer import GradAuditCallback
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from gradaudit import AuditConfig

    torch.set_num_threads(1)  # the machine is shared with the test process and the worker
    out = Path(out)
    tokenizer = make_tiny_tokenizer(out)
    marker = out / "worker.pid"
    hangs = mode in ("hang", "raise")
    hang = {"build_marker": str(marker), "build_sleep_s": 600} if hangs else {}
    options = {"marker": str(marker)} if mode == "block" else {}
    config = AuditConfig(
        modules=["query@0"], every_n_steps=3, attack="blocking", attack_options=options,
        output_dir=str(out / "audit"), background=True,
    )  # fmt: skip
    args = TrainingArguments(
        str(out / "trainer"), per_device_train_batch_size=4, max_steps=9, use_cpu=True,
        report_to=[], disable_tqdm=True, save_strategy="steps", save_steps=5, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=fault_model(tokenizer.vocab_size, **hang),
        args=args,
        train_dataset=TinyTexts(tokenizer, 64),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=[Announce(fail_at=7 if mode == "raise" else None, marker=marker)],
    )
    if zero_arg:
        settings = {k: v for k, v in config.to_dict().items() if k != "output_dir"}
        (out / "gradaudit.json").write_text(json.dumps(settings))
        os.environ["GRADAUDIT_CONFIG"] = str(out / "gradaudit.json")
        os.environ["GRADAUDIT_OUTPUT_DIR"] = str(out / "audit")
        trainer.add_callback(GradAuditCallback)
    else:
        trainer.add_callback(GradAuditCallback(config))
    trainer.train()


def write_child(folder: Path, mode: str) -> list[str]:
    """The command that runs `run_child(folder, mode)` as a script of its own."""
    script = folder / "train.py"
    paths = [str(TESTS), str(Path(__file__).parent)]
    script.write_text(
        f"import sys\nsys.path[:0] = {paths!r}\n"
        "if __name__ == '__main__':  # the spawned worker re-imports this script\n"
        f"    from _faults import run_child\n    run_child({str(folder)!r}, {mode!r})\n"
    )
    return [sys.executable, str(script)]
