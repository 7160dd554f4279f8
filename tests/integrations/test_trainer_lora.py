"""GradAuditCallback in a real transformers.Trainer training a real PEFT LoRA model."""

from __future__ import annotations

import pytest
import torch
from _tiny import final_weights, make_trainer, read_audits, tiny_config
from conftest import make_tiny_model
from peft import LoraConfig, TaskType, get_peft_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA_A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default"
ZERO_B = "not attacked: nothing to recover from lora_A at this step"
REGIMES = ("span exact", "span partial", "gradient matching")


def lora_trainer(tokenizer, out, config=None, *, max_steps: int):
    """A CPU Trainer over the tiny BERT with LoRA r = 16 on query and value (PEFT's own
    initialisation: lora_B = 0); with `config`, the callback audits it."""
    lora = LoraConfig(r=16, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS)
    model = get_peft_model(make_tiny_model(tokenizer.vocab_size), lora)  # seeded: same init
    return make_trainer(tokenizer, out, config, max_steps=max_steps, model=model)


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in final_weights(model).items() if ".lora_A." in k or ".lora_B." in k}


def test_adapter_gradients_are_captured_and_attacked_once_B_has_moved(tokenizer, tmp_path):
    config = tiny_config(tmp_path / "audit", modules=["query@0:lora_A"], attack="auto")
    trainer = lora_trainer(tokenizer, tmp_path, config, max_steps=6)
    trainer.train()
    first, later = read_audits(tmp_path / "audit")
    assert (first["step"], later["step"]) == (1, 6)
    assert first["modules"] == later["modules"] == [LORA_A]
    # Step 1's gradient is taken before the first optimizer step: PEFT's lora_B is still zero.
    assert first["error"].startswith(ZERO_B) and "lora_B is still zero" in first["error"]
    assert first["rouge1"] is None and first["info"]["zero_gradient"] is True
    assert first["batch_size"] == 4 and len(first["references"]) == 4
    # By step 6 the adapter has trained: its gradient is attacked and scored.
    assert later["error"] is None and 0 <= later["rouge1"] <= 1
    regime = later["info"]["regime"]
    ran = later["info"]["auto"]["ran"]
    assert regime == "gradient matching" if ran == "gradmatch" else regime in REGIMES[:2]
    logged = [h for h in trainer.state.log_history if "gradaudit/rouge1" in h]
    assert [h["gradaudit/audited_step"] for h in logged] == [6]  # step 1 is not a score


def test_auditing_lora_does_not_change_the_adapter_weights(tokenizer, tmp_path):
    """Same seed, 12 steps with dropout: bit-identical adapters with and without the auditor."""
    plain = lora_trainer(tokenizer, tmp_path / "plain", max_steps=12)
    plain.train()
    config = tiny_config(tmp_path / "audit", modules=["query@0:lora_A"], attack="span")
    audited = lora_trainer(tokenizer, tmp_path / "audited", config, max_steps=12)
    audited.train()
    audits = read_audits(tmp_path / "audit")
    assert [a["step"] for a in audits] == [1, 6, 11]
    assert all(a["error"] is None for a in audits[1:])  # the attacks ran inline meanwhile
    expected, got = adapter_weights(plain.model), adapter_weights(audited.model)
    assert len(expected) == 8  # lora_A and lora_B of query and value in two layers
    assert expected.keys() == got.keys()
    assert all(torch.any(v) for k, v in expected.items() if ".lora_B." in k)  # B has trained
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    everything, audited_all = final_weights(plain.model), final_weights(audited.model)
    assert all(torch.equal(everything[k], audited_all[k]) for k in everything)
