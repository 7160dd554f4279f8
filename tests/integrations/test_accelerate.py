"""AccelerateAuditor in a real Accelerate loop on CPU: accumulation, clipping, trackers, resume.

DDP (2 CPU processes, gloo) is a manual check, too slow for CI on 2 shared cores:
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --data PATH --steps 3 --every 2
the report's batch_size is then the sum over both ranks (16) and info.ranks is 2.
"""

from __future__ import annotations

import pytest
import torch
from _tiny import TinyTexts, read_audits, tiny_config
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from conftest import make_tiny_model
from gradaudit.integrations.accelerate import AccelerateAuditor
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ListTracker(GeneralTracker):
    """An Accelerate tracker keeping what it is given, as a real `log_with` target."""

    name = "list"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict, int | None]] = []

    @property
    def tracker(self):
        return self.logged

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((values, step))


def run_loop(accelerator, tokenizer, config, *, steps, accumulation=2, resume_from=None):
    model = make_tiny_model(tokenizer.vocab_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(
        TinyTexts(tokenizer, 4 * steps * accumulation),
        batch_size=4,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    auditor = AccelerateAuditor(
        accelerator, model, optimizer, config, tokenizer=tokenizer, max_grad_norm=1e-3
    )
    accelerator.register_for_checkpointing(auditor)
    if resume_from is not None:
        accelerator.load_state(resume_from)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1e-3)
            optimizer.step()
            optimizer.zero_grad()
    auditor.close()
    return auditor


def test_accelerate_loop_audits_sampled_steps_and_logs_to_trackers(tokenizer, tmp_path):
    tracker = ListTracker()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2, log_with=[tracker])
    accelerator.init_trackers("gradaudit-test")
    auditor = run_loop(accelerator, tokenizer, tiny_config(tmp_path, every_n_steps=3), steps=5)
    assert auditor.step == 5  # optimizer steps, not micro-batches
    audits = read_audits(tmp_path)
    assert [a["step"] for a in audits] == [1, 4]
    for audit in audits:
        assert audit["error"] is None and 0 <= audit["rouge1"] <= 1
        assert (audit["batch_size"], audit["gradient"]) == (8, "clipped")
    logged = [values for values, _ in tracker.logged if "gradaudit/rouge1" in values]
    assert [v["gradaudit/audited_step"] for v in logged] == [1, 4]
    accelerator.end_training()


def test_checkpointed_auditor_state_is_restored(tokenizer, tmp_path):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    config = tiny_config(tmp_path / "audit", steps=[2], attack=None)
    first = run_loop(accelerator, tokenizer, config, steps=3)
    accelerator.save_state(str(tmp_path / "ckpt"))
    assert first.state_dict() == {"step": 3, "audits": 1, "audited_steps": [2]}
    resumed = Accelerator(cpu=True, gradient_accumulation_steps=2)
    again = run_loop(resumed, tokenizer, config, steps=1, resume_from=str(tmp_path / "ckpt"))
    assert again.state_dict() == {"step": 4, "audits": 1, "audited_steps": [2]}
    assert [a["step"] for a in read_audits(tmp_path / "audit")] == [2]
