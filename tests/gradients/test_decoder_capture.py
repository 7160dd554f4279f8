"""Capture on decoders: GPT-2's Conv1D and Llama gradients equal a real backward's `.grad`."""

from __future__ import annotations

import copy

import pytest
import torch
from _decoders import decoder_tokenizer, tiny_gpt2, tiny_llama

from gradaudit import GradAuditError, GradientSnapshot, capture, select_modules
from gradaudit.gradients.snapshot import require_per_token
from gradaudit.model.batch import make_batch
from gradaudit.model.linear import conv1d_names, is_linear, to_linear

TEXTS = ["the movie was very good", "a boring film", "i love this music"]


def _trained_grads(model, batch, names):
    """`.grad` of each module's weight after a real training backward (no token types)."""
    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model(**inputs).loss.backward()
    grads = {n: model.get_submodule(n).weight.grad.clone() for n in names}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_capture_equals_a_real_backward(make):
    model = make()
    batch = make_batch(model, decoder_tokenizer(), TEXTS)
    names = select_modules(model, ["layer@0", "ffn_out@1"])
    snapshot = capture(model, batch, names)
    trained = _trained_grads(model, batch, names)
    for name in names:
        assert snapshot.weight_gradient(name).shape == model.get_submodule(name).weight.shape
        torch.testing.assert_close(snapshot.weight_gradient(name), trained[name])
    assert snapshot.meta["not_per_token"] == {}


def test_conv1d_as_linear_computes_the_same_and_its_gradient_is_the_transpose():
    model = tiny_gpt2()
    batch = make_batch(model, decoder_tokenizer(), TEXTS)
    names = select_modules(model, ["qkv@1", "ffn_in@0"])
    snapshot = capture(model, batch, names, include_weights=True)
    copied = copy.deepcopy(model)
    assert to_linear(copied) == conv1d_names(model) and conv1d_names(copied) == []
    assert isinstance(copied.transformer.h[1].attn.c_attn, torch.nn.Linear)
    assert all(is_linear(copied.get_submodule(n)) for n in names)
    linear = snapshot.as_linear(names)
    trained = _trained_grads(copied, batch, names)
    for name in names:
        assert copied.get_submodule(name).weight.shape[1] == model.config.n_embd
        torch.testing.assert_close(linear.weight_gradient(name), trained[name])
        torch.testing.assert_close(linear.weights[f"{name}.weight"], snapshot.weights[
            f"{name}.weight"].T)  # fmt: skip
    assert snapshot.as_linear([]) is snapshot


def test_a_decoder_snapshot_round_trips(tmp_path):
    model = tiny_gpt2()
    batch = make_batch(model, decoder_tokenizer(), TEXTS[:2])
    snapshot = capture(model, batch, select_modules(model, "qkv@0"))
    loaded = GradientSnapshot.load(snapshot.save(tmp_path / "s"), model)
    assert torch.equal(loaded.batch["labels"], batch["labels"])
    assert loaded.meta["not_per_token"] == {}


def test_modules_without_per_token_inputs_are_listed_and_refused(tiny_model, tiny_tokenizer):
    batch = make_batch(tiny_model, tiny_tokenizer, ["the movie was good", "a bad plot"], [1, 0])
    snapshot = capture(tiny_model, batch, ["bert.pooler.dense", "classifier", "bert.encoder."
                                           "layer.0.attention.self.query"])  # fmt: skip
    assert sorted(snapshot.meta["not_per_token"]) == ["bert.pooler.dense", "classifier"]
    require_per_token(snapshot, ["bert.encoder.layer.0.attention.self.query"], "this attack")
    with pytest.raises(GradAuditError, match="'classifier' took one vector per sentence"):
        require_per_token(snapshot, ["classifier"], "this attack")
