"""Deep mode's order polish: token swaps kept where the gradient's cosine improves."""

from __future__ import annotations

import pytest
import torch

from gradaudit.attacks.base import attack_model, content_mask
from gradaudit.attacks.gradmatch import GradientMatcher, GradMatchOptions
from gradaudit.attacks.span.deep.polish import polish_order, sentence_swaps
from gradaudit.gradients.capture import capture
from gradaudit.model.batch import make_batch
from gradaudit.model.families import layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_swaps_exchange_two_distinct_text_tokens_of_one_sentence_only():
    ids = torch.tensor([[101, 5, 6, 5, 102], [101, 7, 8, 102, 0]])
    content = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    variants = sentence_swaps(ids, content, 0)
    # Three text positions make three pairs; the pair of equal tokens (5, 5) is no change.
    assert len(variants) == 2
    assert all(torch.equal(v[1], ids[1]) for v in variants)  # the other sentence is held
    assert {tuple(v[0].tolist()) for v in variants} == {(101, 6, 5, 5, 102), (101, 5, 5, 6, 102)}


def test_polish_puts_swapped_tokens_back_in_the_order_the_gradient_matches(
    tiny_model, tiny_tokenizer
):
    text = "the movie was very good"
    batch = make_batch(tiny_model, tiny_tokenizer, [text], [1])
    snapshot = capture(tiny_model, batch, ["bert.encoder.layer.1.attention.self.value"])
    model = attack_model(tiny_model, snapshot, torch.device("cpu"))
    matcher = GradientMatcher(model, snapshot, tiny_tokenizer, torch.device("cpu"),
                              GradMatchOptions(reg_weight=0))  # fmt: skip
    content = content_mask(snapshot, tiny_tokenizer)
    truth = batch["input_ids"]
    wrong = truth.clone()
    wrong[0, [2, 4]] = truth[0, [4, 2]]  # "the very was movie good"
    embeddings = layout(model).word_embeddings.weight.detach()
    ids, details = polish_order(matcher, lambda i: embeddings[i], wrong, content, 3, 64)
    assert torch.equal(ids, truth)
    before, after = details["polish_distance"]
    assert after < before and after < 1e-4 and details["polish_swaps"] == 1
