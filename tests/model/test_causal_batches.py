"""Batches for causal LMs: the text is its own label, padding ignored, clear errors."""

from __future__ import annotations

import pytest
import torch
from _decoders import decoder_tokenizer, tiny_gpt2, tiny_llama

from gradaudit import GradAuditError, capture, select_modules
from gradaudit.model.batch import check_batch, make_batch, model_inputs


def test_causal_labels_are_the_input_ids_with_padding_ignored():
    model = tiny_llama()
    batch = make_batch(model, decoder_tokenizer(), ["the movie was very good", "a film"])
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]  # right-padded
    ids = batch["input_ids"]
    assert batch["labels"][0].tolist() == ids[0].tolist()
    assert batch["labels"][1].tolist() == [*ids[1, :2].tolist(), -100, -100, -100]
    loss = model(**model_inputs(model, batch)).loss
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    shifted = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, shifted)  # the standard shifted loss


def test_labels_are_none_for_a_causal_lm_and_given_for_a_classifier():
    tokenizer = decoder_tokenizer()
    with pytest.raises(GradAuditError, match="causal language model.*labels=None"):
        make_batch(tiny_llama(), tokenizer, ["a film"], [1])
    classifier = tiny_llama(classifier=True)
    with pytest.raises(GradAuditError, match="sequence classifier: pass one label per text"):
        make_batch(classifier, tokenizer, ["a film"], None)
    batch = make_batch(classifier, tokenizer, ["a film", "the plot was slow"], [1, 0])
    assert batch["labels"].tolist() == [1, 0]
    snapshot = capture(classifier, batch, select_modules(classifier, "query@1"))
    assert snapshot.weight_gradient("model.layers.1.self_attn.q_proj").abs().sum() > 0


def test_a_tokenizer_without_a_pad_token_gets_the_fix_unless_the_batch_has_one_text():
    tokenizer = decoder_tokenizer(pad=False)
    model = tiny_gpt2()
    with pytest.raises(GradAuditError, match=r"no pad token.*tokenizer.pad_token = tokenizer"):
        make_batch(model, tokenizer, ["a film", "the plot"])
    batch = make_batch(model, tokenizer, ["the plot was slow"])
    assert batch["labels"].tolist() == batch["input_ids"].tolist()


def test_sequences_longer_than_the_context_are_refused():
    words = " ".join(["film"] * 40)
    with pytest.raises(GradAuditError, match="more than the model's 32 positions"):
        make_batch(tiny_llama(), decoder_tokenizer(), [words])
    ids = torch.ones((1, 40), dtype=torch.long)
    with pytest.raises(GradAuditError, match="max_length=32"):
        check_batch({"input_ids": ids}, tiny_gpt2())


def test_check_batch_derives_causal_labels_but_a_classifier_batch_still_needs_them():
    ids = torch.tensor([[2, 3, 4], [5, 6, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    batch = check_batch({"input_ids": ids, "attention_mask": mask}, tiny_llama())
    assert batch["labels"].tolist() == [[2, 3, 4], [5, 6, -100]]
    with pytest.raises(GradAuditError, match="lacks labels"):
        check_batch({"input_ids": ids}, tiny_llama(classifier=True))
    with pytest.raises(GradAuditError, match="lacks labels"):
        check_batch({"input_ids": ids})


def test_a_left_padded_batch_is_captured_as_trained():
    model = tiny_llama()
    tokenizer = decoder_tokenizer()
    encoded = tokenizer(["a film", "the movie was very good"], padding=True, padding_side="left",
                        return_tensors="pt")  # fmt: skip
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    left = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": labels}  # fmt: skip
    name = "model.layers.1.self_attn.v_proj"
    model(**left).loss.backward()
    trained = model.get_submodule(name).weight.grad.clone()
    model.zero_grad()
    snapshot = capture(model, left, [name])
    assert snapshot.batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1] * 5]
    torch.testing.assert_close(snapshot.weight_gradient(name), trained)
    derived = check_batch({k: v for k, v in left.items() if k != "labels"}, model)
    assert derived["labels"].tolist() == labels.tolist()


def test_gpt2_never_sees_token_types():
    model = tiny_gpt2()
    batch = check_batch({"input_ids": torch.tensor([[2, 4, 5]])}, model)
    assert "token_type_ids" in batch and "token_type_ids" not in model_inputs(model, batch)
    assert model.transformer.wte.weight[0].abs().sum() > 0  # type 0 would have shifted inputs
