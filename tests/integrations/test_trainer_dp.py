"""GradAuditCallback in a real transformers.Trainer made private with Opacus (dp-transformers
style, `examples/trainer_dp.py`): it audits the released gradient and reports the engine's ε."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _dp import Releases
from _tiny import TinyTexts, final_weights
from conftest import make_tiny_model
from gradaudit.integrations.trainer import GradAuditCallback
from opacus import PrivacyEngine
from transformers import DataCollatorWithPadding, TrainingArguments

from gradaudit import AuditConfig, GradAuditError, GradientSnapshot
from gradaudit.training.worker import snapshot_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trainer_dp.py"
QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"
N = 16  # examples; expected batch 1, so q = 1/16 and about a third of the batches are empty


def _dp_trainer_class():
    spec = importlib.util.spec_from_file_location("trainer_dp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DPTrainer


DPTrainer = _dp_trainer_class()


def make_dp_trainer(tokenizer, out: Path, *, steps: int, sigma: float = 1.0, seed: int = 0):
    model = make_tiny_model(tokenizer.vocab_size).train()
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)  # Opacus needs it
    engine = PrivacyEngine(accountant="rdp")
    trainer = DPTrainer(
        model=model,
        args=TrainingArguments(
            str(out / "trainer"),
            max_steps=steps,
            per_device_train_batch_size=1,
            learning_rate=1e-3,
            max_grad_norm=0.0,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=seed,
        ),
        train_dataset=TinyTexts(tokenizer, N),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        privacy_engine=engine,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
    )
    return trainer, engine


def dp_config(out: Path, **overrides) -> AuditConfig:
    settings = {
        "modules": ["query@0"],
        "every_n_steps": 1,
        "attack": None,
        "background": False,
        "keep_snapshots": True,
        "output_dir": str(out),
    }
    return AuditConfig(**{**settings, **overrides})


def test_trainer_with_opacus_audits_the_released_gradient_with_the_engines_epsilon(
    tokenizer, tmp_path
):
    trainer, engine = make_dp_trainer(tokenizer, tmp_path, steps=8)
    trainer.add_callback(GradAuditCallback(dp_config(tmp_path / "audit"), privacy_engine=engine))
    dp_optimizer = trainer.optimizer
    param = trainer.model._module.get_parameter(QUERY0)
    releases = Releases(dp_optimizer, param, engine, 1 / N)
    before = param.detach().clone()
    trainer.train()

    assert trainer.state.global_step == 8 and len(releases.sizes) == 8
    assert 0 in releases.sizes and any(releases.sizes)  # empty and full Poisson batches
    assert not torch.equal(param.detach(), before)
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    audits = report["audits"]
    assert [a["step"] for a in audits] == sorted(releases.gradients)  # empty batches skipped
    for audit in audits:
        assert audit["gradient"] == "noised" and audit["error"] is not None  # capture only
        assert audit["epsilon"] == releases.epsilons[audit["step"]]
        snapshot = GradientSnapshot.load(snapshot_dir(tmp_path / "audit", audit["step"]))
        assert snapshot.kind == "noised"
        assert torch.equal(snapshot.gradients[QUERY0], releases.gradients[audit["step"]])
    assert report["epsilon"] == engine.get_epsilon(1 / N)  # δ = 1/N from the training data
    assert report["privacy"]["delta"] == 1 / N and report["privacy"]["steps"] == 8


def test_auditing_a_dp_trainer_does_not_change_its_training(tokenizer, tmp_path):
    """Same seed: Poisson batches and noise come out the same, so do the weights."""
    plain, _ = make_dp_trainer(tokenizer, tmp_path / "plain", steps=6)
    plain.train()
    audited, engine = make_dp_trainer(tokenizer, tmp_path / "audited", steps=6)
    audited.add_callback(GradAuditCallback(dp_config(tmp_path / "audit"), privacy_engine=engine))
    audited.train()
    assert json.loads((tmp_path / "audit" / "report.json").read_text())["audits"]
    expected, got = final_weights(plain.model), final_weights(audited.model)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_dp_trainer_without_the_privacy_engine_is_refused_before_the_first_step(
    tokenizer, tmp_path
):
    trainer, _ = make_dp_trainer(tokenizer, tmp_path, steps=2)
    trainer.add_callback(GradAuditCallback(dp_config(tmp_path / "audit")))
    with pytest.raises(GradAuditError, match="pass privacy_engine="):
        trainer.train()
    assert trainer.state.global_step == 0
