"""AccelerateAuditor on an Opacus DP-SGD loop prepared by a real Accelerator on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _dp import Releases
from _tiny import TinyTexts
from accelerate import Accelerator
from conftest import make_tiny_model
from gradaudit.integrations.accelerate import AccelerateAuditor
from opacus import PrivacyEngine
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from gradaudit import AuditConfig, GradAuditError, GradientSnapshot
from gradaudit.privacy import dp_step
from gradaudit.training.worker import snapshot_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUERY0 = "bert.encoder.layer.0.attention.self.query.weight"
N = 16  # examples; expected batch 1, so q = 1/16 and some Poisson batches are empty


def prepared_private_loop(tokenizer, accelerator: Accelerator):
    """A tiny BERT made private by Opacus, then prepared by the accelerator."""
    torch.manual_seed(0)
    model = make_tiny_model(tokenizer.vocab_size).train()
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)  # Opacus needs it
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = DataLoader(
        TinyTexts(tokenizer, N), batch_size=1, collate_fn=DataCollatorWithPadding(tokenizer)
    )
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, noise_generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    private, optimizer, loader = accelerator.prepare(private, optimizer, loader)
    return model, private, optimizer, loader, engine


def dp_config(out: Path) -> AuditConfig:
    return AuditConfig(
        modules=["query@0"], every_n_steps=1, max_audits=None, attack=None, background=False,
        keep_snapshots=True, output_dir=str(out),
    )  # fmt: skip


def test_accelerate_dp_loop_audits_the_released_gradient_with_the_engines_epsilon(
    tokenizer, tmp_path
):
    accelerator = Accelerator(cpu=True)
    model, private, optimizer, loader, engine = prepared_private_loop(tokenizer, accelerator)
    auditor = AccelerateAuditor(
        accelerator, private, optimizer, dp_config(tmp_path), privacy_engine=engine, dataset_size=N
    )
    dp_optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps the DPOptimizer
    param = model.get_parameter(QUERY0)
    releases = Releases(dp_optimizer, param, engine, 1 / N)
    losses = [dp_step(private, optimizer, batch, backward=accelerator.backward) for batch in loader]
    auditor.close()

    assert auditor.step == len(releases.sizes) == len(losses) == N  # one DP step per Poisson batch
    assert 0 in releases.sizes and any(releases.sizes)  # the seed gives empty and full batches
    assert [loss is None for loss in losses] == [size == 0 for size in releases.sizes]
    report = json.loads((tmp_path / "report.json").read_text())
    audits = report["audits"]
    assert [a["step"] for a in audits] == sorted(releases.gradients)  # empty batches skipped
    for audit in audits:
        assert audit["gradient"] == "noised"
        assert audit["epsilon"] == releases.epsilons[audit["step"]]
        snapshot = GradientSnapshot.load(snapshot_dir(tmp_path, audit["step"]))
        assert torch.equal(snapshot.gradients[QUERY0], releases.gradients[audit["step"]])
    assert report["epsilon"] == engine.get_epsilon(1 / N)
    assert report["privacy"]["steps"] == N and report["privacy"]["dataset_size"] == N


@pytest.mark.parametrize("missing", ["privacy_engine", "dataset_size"])
def test_accelerate_dp_loop_without_a_way_to_epsilon_is_refused_naming_the_fix(
    tokenizer, tmp_path, missing
):
    accelerator = Accelerator(cpu=True)
    _, private, optimizer, _, engine = prepared_private_loop(tokenizer, accelerator)
    wiring = {"privacy_engine": engine, "dataset_size": N}
    del wiring[missing]
    with pytest.raises(GradAuditError, match=f"pass {missing}="):
        AccelerateAuditor(accelerator, private, optimizer, dp_config(tmp_path), **wiring)
