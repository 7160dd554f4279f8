"""Auditing causal LMs: `audit_batch` with labels None, gradmatch on Llama and GPT-2 copies."""

from __future__ import annotations

import pytest
import torch
from _decoders import decoder_tokenizer, tiny_gpt2, tiny_llama

from gradaudit import GradAuditError, audit_batch, capture, get_attack, select_modules
from gradaudit.attacks.base import attack_model
from gradaudit.attacks.gradmatch import GradientMatcher, GradMatchOptions
from gradaudit.model.batch import make_batch
from gradaudit.model.families import eager_attention, layout
from gradaudit.model.linear import uniform_copy

TEXTS = ["the movie was very good", "a boring film"]
SHORT = dict(steps=8, init_candidates=2, init_permutations=2, moves_every=4, moves=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("make", "spec"), [(tiny_llama, "query@1"), (tiny_gpt2, "qkv@1")])
def test_true_embeddings_match_the_observed_gradient_on_the_attack_copy(make, spec):
    model = make()
    tokenizer = decoder_tokenizer()
    snapshot = capture(model, make_batch(model, tokenizer, TEXTS), select_modules(model, spec))
    copy = attack_model(model, snapshot, torch.device("cpu"))
    observed = snapshot.as_linear(uniform_copy(copy))
    with eager_attention(copy):
        matcher = GradientMatcher(
            copy, observed, tokenizer, torch.device("cpu"), GradMatchOptions(reg_weight=0.0)
        )
        true = layout(copy).word_embeddings(snapshot.batch["input_ids"]).detach()
        noise = torch.randn(true.shape, generator=torch.Generator().manual_seed(0))
        losses = matcher.losses(torch.stack([true, noise]))
    assert losses[0].item() < 1e-5  # the right inputs reproduce the gradient exactly
    assert losses[1].item() > 0.05


@pytest.mark.parametrize(("make", "spec"), [(tiny_llama, "value@1"), (tiny_gpt2, "ffn_in@0")])
def test_audit_batch_takes_labels_none_for_a_causal_lm(make, spec):
    model = make()
    result = audit_batch(
        model, decoder_tokenizer(), TEXTS, None, spec, "gradmatch", budget=1.0, **SHORT
    )
    assert result.references == TEXTS
    assert len(result.reconstructions) == 2 and 0 <= result.rouge1 <= 1
    assert result.modules == select_modules(model, spec)
    assert result.attack == "gradmatch" and result.info["steps"] == 8


def test_gradmatch_on_a_tiny_llama_recovers_more_than_chance():
    model = tiny_llama(hidden=32, seed=1)
    tokenizer = decoder_tokenizer()
    batch = make_batch(model, tokenizer, ["the movie was good"])
    snapshot = capture(model, batch, select_modules(model, "layer@0"))
    attack = get_attack("gradmatch", steps=150, init_candidates=20, init_permutations=20)
    rec = attack.reconstruct(model, snapshot, tokenizer=tokenizer, seed=0, budget=1.0)
    assert rec.info["best_loss"] < rec.info["init_loss"]
    right = sum(a == b for a, b in zip(rec.token_ids[0], batch["input_ids"][0].tolist()))
    assert right >= 2  # of 4 words from 34 (chance: about 0.1)


def test_span_exact_mode_says_it_does_not_support_llama_yet():
    model = tiny_llama()
    with pytest.raises(GradAuditError, match="not supported for the llama family yet"):
        audit_batch(model, decoder_tokenizer(), TEXTS[:1], None, "query@0", "span")
