"""GradAuditCallback in a real transformers.Trainer: reports, accumulation, resume, no effect."""

from __future__ import annotations

import pytest
import torch
from _tiny import final_weights, make_trainer, read_audits, tiny_config
from gradaudit.integrations.trainer import GradAuditCallback
from transformers import TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from gradaudit import GradAuditError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sampled_steps_are_audited_with_accumulation_and_clipping(tokenizer, tmp_path):
    config = tiny_config(tmp_path / "audit", every_n_steps=3)
    trainer = make_trainer(
        tokenizer, tmp_path, config, max_steps=6, gradient_accumulation_steps=2, max_grad_norm=1e-3
    )
    trainer.train()
    audits = read_audits(tmp_path / "audit")
    assert [a["step"] for a in audits] == [1, 4]
    for audit in audits:
        assert audit["error"] is None and 0 <= audit["rouge1"] <= 1
        assert audit["batch_size"] == 8 and audit["info"]["micro_batches"] == 2
        assert audit["gradient"] == "clipped" and audit["modules"] == [
            "bert.encoder.layer.0.attention.self.query"
        ]
    logged = [h for h in trainer.state.log_history if "gradaudit/rouge1" in h]
    assert [h["gradaudit/audited_step"] for h in logged] == [1, 4]


def test_unclipped_gradient_is_raw(tokenizer, tmp_path):
    config = tiny_config(tmp_path / "audit", steps=[1], attack=None)
    make_trainer(tokenizer, tmp_path, config, max_steps=1, max_grad_norm=1e6).train()
    (audit,) = read_audits(tmp_path / "audit")
    assert audit["gradient"] == "raw" and audit["info"]["max_grad_norm"] == 1e6


def test_resume_from_checkpoint_keeps_counting(tokenizer, tmp_path):
    """Audits at 1 and 4 with max_audits=2: the resumed run knows step 1 was audited."""
    out = tmp_path / "audit"
    config = tiny_config(out, every_n_steps=3, max_audits=2)
    first = make_trainer(
        tokenizer, tmp_path, config, max_steps=3, save_strategy="steps", save_steps=3
    )
    first.train()
    assert [a["step"] for a in read_audits(out)] == [1]
    resumed = make_trainer(tokenizer, tmp_path, config, max_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-3"))
    audits = read_audits(out)
    assert [a["step"] for a in audits] == [1, 4]  # 7 would be a third audit
    assert all(a["error"] is None for a in audits)


def test_auditing_does_not_change_training(tokenizer, tmp_path):
    """Same seed, 20 steps with dropout: bit-identical weights with and without the auditor."""
    plain = make_trainer(tokenizer, tmp_path / "plain", max_steps=20)
    plain.train()
    config = tiny_config(tmp_path / "audit", every_n_steps=5)
    audited = make_trainer(tokenizer, tmp_path / "audited", config, max_steps=20)
    audited.train()
    assert [a["step"] for a in read_audits(tmp_path / "audit")] == [1, 6, 11, 16]
    expected, got = final_weights(plain.model), final_weights(audited.model)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert audited.model.training == plain.model.training


def test_unknown_module_fails_before_the_first_step(tokenizer, tmp_path):
    trainer = make_trainer(
        tokenizer, tmp_path, tiny_config(tmp_path / "a", modules=["nope"]), max_steps=2
    )
    with pytest.raises(GradAuditError, match="matches no module"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_fsdp_is_refused_at_train_begin(tokenizer, tmp_path):
    callback = GradAuditCallback(tiny_config(tmp_path / "a"))
    args = TrainingArguments(str(tmp_path / "t"), fsdp=True, use_cpu=True, report_to=[])
    with pytest.raises(GradAuditError, match="does not support FSDP"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=None)
