import os
import stat

import pytest
import torch

from gradaudit import GradAuditError, GradientSnapshot, capture, select_modules
from gradaudit.model.batch import make_batch

TEXTS = ["the movie was charming .", "a very boring plot"]
LABELS = [1, 0]


@pytest.fixture
def batch(tiny_model, tiny_tokenizer):
    return make_batch(tiny_model, tiny_tokenizer, TEXTS, LABELS)


def test_capture_returns_only_the_selected_weight_gradients(tiny_model, batch):
    modules = select_modules(tiny_model, ["query@0", "ffn_in@1"])
    snap = capture(tiny_model, batch, modules)
    assert sorted(snap.gradients) == sorted(f"{m}.weight" for m in modules)
    assert snap.kind == "raw" and snap.batch_size == 2
    with_bias = capture(tiny_model, batch, modules, include_bias=True)
    assert len(with_bias.gradients) == 4


def test_capture_matches_a_real_backward_and_touches_no_grad(tiny_model, batch):
    modules = select_modules(tiny_model, "value@1")
    snap = capture(tiny_model, batch, modules)
    assert all(p.grad is None for p in tiny_model.parameters())
    tiny_model(**batch).loss.backward()
    real = GradientSnapshot.from_grads(tiny_model, batch, modules)
    name = f"{modules[0]}.weight"
    torch.testing.assert_close(snap.gradients[name], real.gradients[name])


def test_capture_restores_train_mode_and_rng_state(tiny_model, batch):
    tiny_model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    capture(tiny_model, batch, select_modules(tiny_model, "query@0"))
    assert tiny_model.training
    assert torch.equal(torch.rand(3), expected)


def test_snapshot_round_trips_through_safetensors_privately(tiny_model, batch, tmp_path):
    snap = capture(
        tiny_model, batch, select_modules(tiny_model, "key@0"), step=7, include_weights=True
    )
    snap.save(tmp_path / "snap")
    files = sorted(p.name for p in (tmp_path / "snap").iterdir())
    assert files == ["gradients.safetensors", "snapshot.json", "weights.safetensors"]
    for p in (tmp_path / "snap").iterdir():
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "snap").st_mode) == 0o700
    back = GradientSnapshot.load(tmp_path / "snap", tiny_model)
    assert back.step == 7 and back.modules == snap.modules and back.kind == "raw"
    for k in snap.gradients:
        assert torch.equal(back.gradients[k], snap.gradients[k])
    for k in snap.batch:
        assert torch.equal(back.batch[k], snap.batch[k])
    assert torch.equal(back.weights["classifier.weight"], tiny_model.classifier.weight)


def test_loading_a_snapshot_with_another_model_is_refused(tiny_model, batch, tmp_path):
    from conftest import make_tiny_model

    capture(tiny_model, batch, select_modules(tiny_model, "key@0")).save(tmp_path / "s")
    other = make_tiny_model(tiny_model.config.vocab_size, hidden=32)
    with pytest.raises(GradAuditError, match="attack it with the same model"):
        GradientSnapshot.load(tmp_path / "s", other)


def test_nan_gradient_is_a_clear_error(tiny_model, batch):
    snap = capture(tiny_model, batch, select_modules(tiny_model, "key@0"))
    grads = {k: torch.full_like(v, float("nan")) for k, v in snap.gradients.items()}
    with pytest.raises(GradAuditError, match="NaN or inf"):
        GradientSnapshot(grads, snap.batch, snap.modules, "m", snap.config_hash)


def test_missing_module_in_snapshot_names_what_it_holds(tiny_model, batch):
    snap = capture(tiny_model, batch, select_modules(tiny_model, "key@0"))
    with pytest.raises(GradAuditError, match="not in this snapshot"):
        snap.weight_gradient("bert.encoder.layer.1.attention.self.key")


@pytest.mark.parametrize(
    ("texts", "labels", "message"),
    [
        (["a film", "the plot"], [1], "2 texts but 1 labels"),
        (["a film", "  "], [1, 0], "text 1 is empty"),
        (["a film"], [5], "outside the model's labels"),
        ([" ".join(["movie"] * 40)], [0], "more than the model's 32 positions"),
    ],
)
def test_bad_batches_get_one_clear_error(tiny_model, tiny_tokenizer, texts, labels, message):
    with pytest.raises(GradAuditError, match=message):
        make_batch(tiny_model, tiny_tokenizer, texts, labels)


def test_batch_without_labels_is_refused(tiny_model, batch):
    del batch["labels"]
    with pytest.raises(GradAuditError, match="lacks labels"):
        capture(tiny_model, batch, select_modules(tiny_model, "key@0"))


def test_train_mode_capture_is_the_gradient_of_a_seeded_dropout_forward(tiny_model, batch):
    modules = select_modules(tiny_model, ["query@0", "value@1"])
    snap = capture(tiny_model, batch, modules, train_mode=True, seed=7)
    tiny_model.train()
    try:
        torch.manual_seed(7)
        tiny_model.zero_grad()
        tiny_model(**batch).loss.backward()
        params = dict(tiny_model.named_parameters())
        for name, grad in snap.gradients.items():
            torch.testing.assert_close(grad, params[name].grad, rtol=0, atol=0)
    finally:
        tiny_model.eval()
        tiny_model.zero_grad(set_to_none=True)
    assert snap.meta["train_mode"] is True and snap.meta["dropout_seed"] == 7


def test_train_mode_capture_differs_from_eval_and_repeats_with_its_seed(tiny_model, batch):
    modules = select_modules(tiny_model, "query@0")
    name = f"{modules[0]}.weight"
    evaluated = capture(tiny_model, batch, modules).gradients[name]
    first = capture(tiny_model, batch, modules, train_mode=True, seed=1).gradients[name]
    again = capture(tiny_model, batch, modules, train_mode=True, seed=1).gradients[name]
    other = capture(tiny_model, batch, modules, train_mode=True, seed=2).gradients[name]
    assert torch.equal(first, again)
    assert not torch.allclose(first, evaluated) and not torch.allclose(first, other)


def test_train_mode_capture_restores_every_module_mode_and_the_global_generator(tiny_model, batch):
    modules = select_modules(tiny_model, "query@0")
    tiny_model.bert.encoder.layer[0].train()  # a mixed model: one layer in training mode
    modes = {name: m.training for name, m in tiny_model.named_modules()}
    state = torch.random.get_rng_state()
    try:
        capture(tiny_model, batch, modules, train_mode=True, seed=3)
        assert {name: m.training for name, m in tiny_model.named_modules()} == modes
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        tiny_model.eval()


def test_audit_batch_in_train_mode_records_the_mode(tiny_model, tiny_tokenizer):
    from gradaudit import audit_batch

    result = audit_batch(
        tiny_model, tiny_tokenizer, TEXTS[:1], LABELS[:1], "query@0", "span", train_mode=True
    )
    assert result.info["train_mode"] is True
    evaluated = audit_batch(tiny_model, tiny_tokenizer, TEXTS[:1], LABELS[:1], "query@0", "span")
    assert evaluated.info["train_mode"] is False
