import math

import pytest
import torch
from _dp import VOCAB
from _dp import private_training as _private_training
from _dp import tiny_batch as _batch
from conftest import make_tiny_model
from opacus.accountants import RDPAccountant
from torch import nn

from gradaudit import GradAuditError, capture, select_modules
from gradaudit.privacy import (
    check_dp_parameters,
    check_opacus_compatible,
    dp_snapshot,
    engine_epsilon,
    engine_statement,
    epsilon,
    is_empty_batch,
    per_sample_gradients,
    prepare_empty_step,
    privacy_statement,
    private_snapshot,
    step_batch_size,
    watch_released_gradients,
)


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"noise_multiplier": -0.1}, "σ ≥ 0"),
        ({"clip": 0.0}, "positive"),
        ({"sample_rate": 0.0}, "(0, 1]"),
        ({"sample_rate": 1.5}, "(0, 1]"),
        ({"delta": 1.0}, "(0, 1)"),
        ({"delta": 0.0}, "(0, 1)"),
        ({"accountant": "gdp"}, "rdp, prv"),
    ],
)
def test_bad_dp_parameters_name_the_fix(kwargs, fix):
    with pytest.raises(GradAuditError, match=fix.replace("(", r"\(").replace(")", r"\)")):
        check_dp_parameters(**kwargs)


def test_epsilon_comes_from_the_opacus_accountants():
    acc = RDPAccountant()
    for _ in range(50):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)
    assert epsilon(1.1, 0.02, 50, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert 0 < epsilon(1.1, 0.02, 50, 1e-5, "prv") < epsilon(1.1, 0.02, 50, 1e-5)
    assert epsilon(0.0, 0.02, 50, 1e-5) == math.inf
    assert epsilon(1.0, 0.02, 0, 1e-5) == 0.0
    assert epsilon(20.0, 0.001, 1, 0.5) >= 0.0  # a negative RDP conversion reads as 0


def test_statement_states_the_assumptions_in_words():
    s = privacy_statement(
        noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5, clip=1.0, dataset_size=1000
    )
    assert s["epsilon"] == pytest.approx(epsilon(1.0, 0.01, 100, 1e-5))
    for words in ("RDP accountant", "δ = 1e-05", "Example-level", "probability q", "C = 1"):
        assert words in s["statement"]
    shuffled = privacy_statement(
        noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5, sampling="shuffled"
    )
    assert "not Poisson-sampled" in shuffled["statement"]
    none = privacy_statement(noise_multiplier=0.0, sample_rate=0.01, steps=100, delta=1e-5)
    assert none["epsilon"] == math.inf and "no differential privacy" in none["statement"]


def test_a_model_opacus_cannot_wrap_is_named_with_the_reason():
    model = make_tiny_model(VOCAB)
    model.classifier = nn.Sequential(nn.BatchNorm1d(48), nn.Linear(48, 2))
    with pytest.raises(GradAuditError, match=r"classifier\.0 \(BatchNorm1d\).*GroupNorm"):
        check_opacus_compatible(model)
    check_opacus_compatible(make_tiny_model(VOCAB))


def test_sigma_zero_reproduces_the_clipped_non_private_gradient():
    model = make_tiny_model(VOCAB)
    batch = _batch()
    modules = select_modules(model, "query@0")
    name = f"{modules[0]}.weight"
    clip = 0.5
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.zeros_like(model.get_parameter(name))
    for i in range(3):  # one example at a time, clipped by its full gradient norm
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(model(**one).loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        expected += factor * capture(model, one, modules).gradients[name] / 3
    snap = private_snapshot(model, batch, modules, clip=clip, sigma=0.0)
    assert snap.kind == "clipped" and snap.meta["dp"]["clipped_examples"] == 3
    torch.testing.assert_close(snap.gradients[name], expected)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    # A bound no example reaches leaves the plain batch gradient.
    unclipped = private_snapshot(model, batch, modules, clip=1e6, sigma=0.0)
    torch.testing.assert_close(
        unclipped.gradients[name], capture(model, batch, modules).gradients[name]
    )


def test_noise_has_std_sigma_clip_over_batch_and_is_seeded():
    model = make_tiny_model(VOCAB)
    modules = select_modules(model, "value@1")
    name = f"{modules[0]}.weight"
    samples = per_sample_gradients(model, _batch(), modules, clip_scope="modules")
    clean = private_snapshot(model, samples, clip=1.0, sigma=0.0).gradients[name]
    noised = private_snapshot(model, samples, clip=1.0, sigma=2.0, seed=5)
    assert noised.kind == "noised"
    assert float((noised.gradients[name] - clean).std()) == pytest.approx(2.0 / 3, rel=0.05)
    again = private_snapshot(model, samples, clip=1.0, sigma=2.0, seed=5).gradients[name]
    assert torch.equal(again, noised.gradients[name])


def test_released_gradient_is_what_the_dp_optimizer_steps_with_and_epsilon_is_the_engines():
    model, private, optimizer, loader, engine = _private_training(sigma=1.0)
    modules = select_modules(model, "query@0")
    name = f"{modules[0]}.weight"
    param = model.get_parameter(name)
    seen, current, raw_grad = [], {}, {}

    def on_step():
        snap = dp_snapshot(private, optimizer, current, modules)
        raw = dp_snapshot(private, optimizer, current, modules, kind="raw")
        clipped = dp_snapshot(private, optimizer, current, modules, kind="clipped")
        eps = engine_epsilon(engine, 0.1)
        seen.append((step_batch_size(optimizer), snap, raw, clipped, eps))
        if snap is not None:
            assert snap.kind == "noised" and torch.equal(snap.gradients[name], param.grad)
            torch.testing.assert_close(raw.gradients[name], raw_grad["g"])
            assert not torch.allclose(clipped.gradients[name], snap.gradients[name])
        assert eps == engine.get_epsilon(0.1)

    handle = watch_released_gradients(optimizer, on_step)
    assert optimizer.step_hook is not None  # the accountant's hook is left in place
    for _ in range(3):  # Poisson batches of 0, 1, 2, ... examples
        for ids, mask, labels in loader:
            current = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            optimizer.zero_grad()
            if is_empty_batch(current):
                prepare_empty_step(optimizer)
            else:
                private(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
                raw_grad["g"] = param.grad.detach().clone()  # what `.grad` held after backward
            optimizer.step()
    handle.remove()
    sizes = [s[0] for s in seen]
    assert len(seen) == 30 and 0 in sizes and max(sizes) > 1
    assert all((s[1] is None) == (s[0] == 0) for s in seen)  # empty batches: skipped
    assert [s[4] for s in seen] == sorted(s[4] for s in seen)  # ε grows with every step
    statement = engine_statement(engine, 0.1, clip=1.0)
    assert statement["epsilon"] == engine.get_epsilon(0.1) and statement["steps"] == 30
    assert statement["source"] == "engine"


def test_watching_needs_a_dp_optimizer():
    model = make_tiny_model(VOCAB)
    with pytest.raises(GradAuditError, match="make_private"):
        watch_released_gradients(torch.optim.SGD(model.parameters(), lr=0.1), lambda: None)
