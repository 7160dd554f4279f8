"""The Auditor on an Opacus DP-SGD loop: it audits the released (noised) gradient, with ε."""

import json

import pytest
import torch
from test_privacy import _private_training

from gradaudit import AuditConfig, Auditor, GradAuditError, GradientSnapshot
from gradaudit.privacy import dp_step
from gradaudit.worker import snapshot_dir


def test_auditor_captures_the_released_gradient_and_the_engines_epsilon(tmp_path):
    model, private, optimizer, loader, engine = _private_training(sigma=1.0)
    config = AuditConfig(
        modules=["query@0"], every_n_steps=1, attack=None, background=False,
        keep_snapshots=True, output_dir=str(tmp_path), dp_delta=0.1,
    )  # fmt: skip
    auditor = Auditor(private, config, optimizer=optimizer, privacy_engine=engine)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    released, epsilons = {}, {}
    step = {"n": 0}

    def record(*_):  # runs after the auditor's hook, on the same released gradient
        step["n"] += 1
        if optimizer.grad_samples and len(optimizer.grad_samples[0]):
            released[step["n"]] = model.get_parameter(name).grad.detach().clone()
            epsilons[step["n"]] = engine.get_epsilon(0.1)

    optimizer.original_optimizer.register_step_pre_hook(record)
    for _ in range(2):
        for ids, mask, labels in loader:
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            dp_step(private, optimizer, batch)
    auditor.close()

    report = json.loads((tmp_path / "report.json").read_text())
    audited = [a["step"] for a in report["audits"]]
    assert audited == sorted(released) and len(audited) < 20  # empty batches were skipped
    for audit in report["audits"]:
        assert audit["gradient"] == "noised"
        assert audit["epsilon"] == epsilons[audit["step"]]
        snap = GradientSnapshot.load(snapshot_dir(tmp_path, audit["step"]))
        assert torch.equal(snap.gradients[name], released[audit["step"]])
    assert report["epsilon"] == engine.get_epsilon(0.1)
    assert report["privacy"]["delta"] == 0.1 and report["privacy"]["sampling"] == "poisson"


def test_privacy_engine_without_a_dp_optimizer_is_refused(tmp_path):
    """Auditing `.grad` after backward in a DP run would attack what is never released."""
    model, _, _, _, engine = _private_training(sigma=1.0)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    config = AuditConfig(modules=["query@0"], attack=None, output_dir=str(tmp_path), dp_delta=0.1)
    with pytest.raises(GradAuditError, match="pass optimizer= the optimizer PrivacyEngine"):
        Auditor(model, config, optimizer=plain, privacy_engine=engine)
