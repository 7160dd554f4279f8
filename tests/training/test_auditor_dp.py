"""The Auditor on an Opacus DP-SGD loop: it audits the released (noised) gradient, with ε,
and on request the raw gradient behind it for contrast."""

import json

import pytest
import torch
from _dp import VOCAB, private_training
from conftest import WORDS, make_tiny_model, make_tiny_tokenizer

from gradaudit import AuditConfig, Auditor, GradAuditError, GradientSnapshot
from gradaudit.privacy import dp_snapshot, dp_step, watch_released_gradients
from gradaudit.training.results import result_metrics
from gradaudit.training.worker import snapshot_dir


def test_auditor_captures_the_released_gradient_and_the_engines_epsilon(tmp_path):
    model, private, optimizer, loader, engine = private_training(sigma=1.0)
    config = AuditConfig(
        modules=["query@0"], every_n_steps=1, max_audits=None, attack=None, background=False,
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
    model, _, _, _, engine = private_training(sigma=1.0)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    config = AuditConfig(modules=["query@0"], attack=None, output_dir=str(tmp_path), dp_delta=0.1)
    with pytest.raises(GradAuditError, match="pass optimizer= the optimizer PrivacyEngine"):
        Auditor(model, config, optimizer=plain, privacy_engine=engine)


@pytest.mark.usefixtures("one_torch_thread")
def test_dp_contrast_also_audits_the_raw_gradient_behind_each_release(tmp_path):
    model, private, optimizer, loader, engine = private_training(sigma=1.0)
    words = sorted(set(WORDS))[: VOCAB - 10]  # with 5 specials and 5 marks: the model's vocab
    tokenizer = make_tiny_tokenizer(tmp_path, words)
    assert tokenizer.vocab_size == VOCAB
    name = "bert.encoder.layer.0.attention.self.query.weight"
    param = model.get_parameter(name)
    mean_per_example, before, epsilons = {}, {}, {}
    step = {"n": 0}

    def record(*_):  # registered before the auditor's hook: the state it will see
        step["n"] += 1
        if optimizer.grad_samples and len(optimizer.grad_samples[0]):
            mean_per_example[step["n"]] = param.grad_sample.detach().mean(0)
            before["grad"], before["samples"] = param.grad.clone(), param.grad_sample.clone()
            epsilons[step["n"]] = engine.get_epsilon(0.1)

    def untouched(*_):  # registered after it: the optimizer must update with the same tensors
        if step["n"] in mean_per_example:
            assert torch.equal(param.grad, before["grad"])
            assert torch.equal(param.grad_sample, before["samples"])

    optimizer.original_optimizer.register_step_pre_hook(record)
    config = AuditConfig(
        modules=["query@0"], every_n_steps=1, max_audits=2, attack="gradmatch", budget=0.01,
        background=False, keep_snapshots=True, output_dir=str(tmp_path / "audit"),
        dp_delta=0.1, dp_contrast=True,
    )  # fmt: skip
    auditor = Auditor(
        private, config, tokenizer=tokenizer, optimizer=optimizer, privacy_engine=engine
    )
    optimizer.original_optimizer.register_step_pre_hook(untouched)
    for ids, mask, labels in loader:
        dp_step(private, optimizer, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    auditor.close()

    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    pairs: dict[int, dict[str, dict]] = {}
    for audit in report["audits"]:
        pairs.setdefault(audit["step"], {})[audit["gradient"]] = audit
    assert len(report["audits"]) == 4 and all(set(p) == {"noised", "raw"} for p in pairs.values())
    for audited, pair in pairs.items():
        noised, raw = pair["noised"], pair["raw"]
        assert noised["error"] is None and raw["error"] is None  # both were attacked
        assert raw["options"] == noised["options"] and raw["references"] == noised["references"]
        assert raw["epsilon"] == noised["epsilon"] == epsilons[audited]
        assert raw["info"]["contrast"] is True and "contrast" not in noised["info"]
        raw_snap = GradientSnapshot.load(snapshot_dir(tmp_path / "audit", audited, "raw"))
        noised_snap = GradientSnapshot.load(snapshot_dir(tmp_path / "audit", audited))
        assert (raw_snap.kind, noised_snap.kind) == ("raw", "noised")
        torch.testing.assert_close(raw_snap.gradients[name], mean_per_example[audited])
        assert not torch.allclose(raw_snap.gradients[name], noised_snap.gradients[name])
        assert raw_snap.weights.keys() == noised_snap.weights.keys()
        assert all(torch.equal(v, noised_snap.weights[k]) for k, v in raw_snap.weights.items())
    # The verdict and the logged scores are the released gradient's; the contrast is apart.
    assert [s["audits"] for s in report["summary"].values()] == [2]
    for result in auditor.results:
        prefix = "gradaudit/contrast/" if result.gradient == "raw" else "gradaudit/"
        assert all(key.startswith(prefix) for key in result_metrics(result))


def test_dp_contrast_without_a_dp_optimizer_is_refused(tmp_path):
    model = make_tiny_model(VOCAB)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    config = AuditConfig(modules=["query@0"], attack=None, output_dir=str(tmp_path),
                         dp_contrast=True)  # fmt: skip
    with pytest.raises(GradAuditError, match="or set dp_contrast=False"):
        Auditor(model, config, optimizer=plain)
    with pytest.raises(GradAuditError, match="dp_contrast must be true or false"):
        AuditConfig(dp_contrast="false")


def test_raw_gradient_is_refused_when_the_optimizer_lacks_examples_of_the_batch():
    """E.g. a BatchMemoryManager keeps only the last physical batch's per-example gradients."""
    _, private, optimizer, loader, _ = private_training(sigma=1.0)
    modules = ["bert.encoder.layer.0.attention.self.query"]
    errors = []

    def on_step():
        doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
        with pytest.raises(GradAuditError, match="the DPOptimizer holds") as error:
            dp_snapshot(private, optimizer, doubled, modules, kind="raw")
        errors.append(error)
        assert dp_snapshot(private, optimizer, doubled, modules, kind="noised") is not None

    watch_released_gradients(optimizer, on_step)
    for ids, mask, labels in loader:
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if len(ids):  # the first non-empty Poisson batch
            dp_step(private, optimizer, batch)
            break
    assert len(errors) == 1
