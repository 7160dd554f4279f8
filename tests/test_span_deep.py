"""Deep span mode on the tiny random BERT (2 layers, width 48): modules past layer 0."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from gradaudit.attacks import get_attack
from gradaudit.audit import score_reconstruction
from gradaudit.batch import make_batch
from gradaudit.errors import GradAuditError
from gradaudit.families import layout
from gradaudit.snapshot import capture

TEXT = "the charming cast and the music"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small op-bound models run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer.vocab_size)


def snapshot_of(model, tokenizer, texts, component, layer=1):
    batch = make_batch(model, tokenizer, texts, [1] * len(texts))
    return capture(model, batch, [layout(model).component_name(component, layer)])


def truth_of(snapshot):
    lengths = snapshot.batch["attention_mask"].sum(1)
    return [ids[: int(n)].tolist() for ids, n in zip(snapshot.batch["input_ids"], lengths)]


@pytest.mark.parametrize("component", ["key", "value"])
def test_deep_recovers_a_sentence_from_a_layer_1_module(model, tiny_tokenizer, component):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], component)
    result = get_attack("span").reconstruct(
        model, snapshot, tokenizer=tiny_tokenizer, device="cpu", budget=0.3
    )
    assert result.info["mode"] == "deep"
    assert result.token_ids == truth_of(snapshot)
    assert result.info["residual"] < 1e-6  # the truth's span residual is 0
    assert result.info["gradient_cosine"] > 0.999


def test_deep_beats_gradmatch_at_equal_budget(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, ["a very boring plot with bad music"], "value")
    recall = {}
    for attack in ("span", "gradmatch"):
        result = get_attack(attack).reconstruct(
            model, snapshot, tokenizer=tiny_tokenizer, device="cpu", seed=1, budget=0.1
        )
        recall[attack] = score_reconstruction(snapshot, result, tiny_tokenizer)[1].token_recall
    assert recall["span"] >= 0.8
    assert recall["span"] > recall["gradmatch"]


def test_deep_is_deterministic_with_a_seed(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, ["the movie was good", "a dark story"], "key")
    runs = [
        get_attack("span", deep_steps=60, deep_sweeps=2).reconstruct(
            model, snapshot, tokenizer=tiny_tokenizer, device="cpu", seed=7, budget=1.0
        )
        for _ in range(2)
    ]
    assert runs[0].info["mode"] == "deep"
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].info["residual"] == runs[1].info["residual"]
    assert [len(ids) for ids in runs[0].token_ids] == [len(ids) for ids in truth_of(snapshot)]


def test_auto_runs_deep_span_past_layer_0(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "ffn_in", 0)
    result = get_attack("auto").reconstruct(
        model, snapshot, tokenizer=tiny_tokenizer, device="cpu", budget=0.3
    )
    assert result.info["auto"]["ran"] == "span"
    assert result.info["mode"] == "deep"
    assert result.token_ids == truth_of(snapshot)


def test_bad_deep_option_is_an_error():
    with pytest.raises(GradAuditError, match="deep_restarts"):
        get_attack("span", deep_restarts=0)
