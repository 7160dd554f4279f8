"""Attacks on LoRA adapter gradients (real PEFT): B = 0, the span regimes, lora_dropout.

lora_A's gradient is `s B^T delta x^T`: zero while PEFT's lora_B is, then of rank at most
min(r, tokens) with the layer's own inputs x. The partial regime (r < tokens) and train mode
with lora_dropout run on the packaged MiniLM: on the tiny random BERT, an r = 4 lora_A
gradient's leading singular value stands ~250x above the next, more than the last one stands
above the rounding, so its rank reads 1 (rank-limited), and train-mode recovery depends on
the dropout seed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import SENTENCES
from conftest import make_tiny_model
from peft import LoraConfig, TaskType, get_peft_model

from gradaudit import select_modules
from gradaudit.experiments.lora import lora_model
from gradaudit.model.batch import labels_for, make_batch
from gradaudit.model.lora import LoraPart, combined_dropout, lora_part
from gradaudit.scoring.audit import audit_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [text for text, _ in SENTENCES]
LABELS = [label for _, label in SENTENCES]
SHORT = "the movie was very good"  # 7 tokens with [CLS] and [SEP]
ZERO_B = "not attacked: nothing to recover from lora_A at this step"


def lora_B_of(model, lora_A: str) -> torch.Tensor:
    return model.get_submodule(lora_A.replace(".lora_A.", ".lora_B.")).weight


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer.vocab_size), tiny_tokenizer


@pytest.fixture(scope="module")
def fresh(tiny):
    """LoRA r = 16 on query and value as PEFT initialises it (every lora_B zero)."""
    model, _ = tiny
    config = LoraConfig(r=16, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # lora_A's initialisation, whatever ran before
        return get_peft_model(copy.deepcopy(model), config)


@pytest.fixture(scope="module")
def trained(tiny):
    """LoRA r = 16 on query and value after five AdamW steps (lora_B off zero).

    lora_model's seed 0: with seeds 1, 2 and 5 the tiny model's ill-conditioned lora_A
    spectrum (see above) reads as rank-limited for SHORT, and span declines it."""
    model, tokenizer = tiny
    return lora_model(model, tokenizer, 16, ["query", "value"], TEXTS, LABELS)


@pytest.mark.parametrize("attack", ["span", "auto", "gradmatch"])
def test_lora_A_at_peft_initialisation_is_not_attacked_and_says_why(tiny, fresh, attack):
    _, tokenizer = tiny
    (name,) = select_modules(fresh, "query@0:lora_A")
    assert not torch.any(lora_B_of(fresh, name))
    result = audit_batch(fresh, tokenizer, [SHORT], [1], "query@0:lora_A", attack, budget=0.01)
    assert result.error.startswith(ZERO_B)
    assert "lora_B is still zero" in result.error
    assert "use attack='auto'" not in result.error  # no attack could use a zero gradient
    assert result.rouge1 is None and result.token_recall is None and result.exact is None
    assert result.info["zero_gradient"] is True and result.info["mode"] == "none"
    assert result.modules == [name]


def test_lora_B_at_peft_initialisation_is_attacked_as_the_message_advises(tiny, fresh):
    # dL/dB = s delta (A x)^T is not zero at B = 0: its inputs A x lie in its row space.
    _, tokenizer = tiny
    result = audit_batch(fresh, tokenizer, [SHORT], [1], "query@0:lora_B", "span", budget=0.01)
    assert result.error is None
    (name,) = result.modules
    assert result.info["labels"] == {name: "span"}
    assert result.info["regime"] == "span exact"
    assert result.rouge1 == 1.0


@pytest.mark.parametrize("attack", ["span", "auto"])
def test_span_recovers_a_sentence_exactly_from_lora_A_once_B_has_moved(tiny, trained, attack):
    _, tokenizer = tiny
    (name,) = select_modules(trained, "query@0:lora_A")
    assert torch.any(lora_B_of(trained, name))
    result = audit_batch(trained, tokenizer, [SHORT], [1], "query@0:lora_A", attack, budget=0.01)
    assert result.error is None
    assert result.reconstructions == [SHORT] and result.rouge1 == 1.0
    assert result.info["labels"] == {name: "exact"}
    assert result.info["regime"] == "span exact" and result.info["mode"] == "exact"
    spectrum = result.info["spectra"][name]
    assert spectrum["rows"] == 16 and spectrum["rank"] == result.info["tokens"] == 7


def test_gradmatch_on_lora_A_reports_the_gradient_matching_regime(tiny, trained):
    _, tokenizer = tiny
    result = audit_batch(
        trained, tokenizer, [SHORT], [1], "query@0:lora_A", "gradmatch", budget=0.01
    )
    assert result.error is None and 0 <= result.rouge1 <= 1
    assert result.info["regime"] == "gradient matching"


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["span", "auto"])
def test_lora_A_with_rank_below_the_tokens_is_partial_and_still_recovered(minilm, attack):
    model, tokenizer = minilm
    wrapped = lora_model(model, tokenizer, 4, ["query", "value"], TEXTS, LABELS)
    (name,) = select_modules(wrapped, "query@0:lora_A")
    result = audit_batch(wrapped, tokenizer, [SHORT], [1], "query@0:lora_A", attack, budget=0.01)
    assert result.error is None
    spectrum = result.info["spectra"][name]
    assert (spectrum["rank"], spectrum["rows"], result.info["tokens"]) == (4, 4, 7)
    assert result.info["labels"] == {name: "partial"}
    assert result.info["regime"] == "span partial"
    if attack == "auto":
        assert result.info["auto"]["ran"] == "span"
    # The reverse test alone pins the sentence down (1.0 over lora_model seeds 0-4).
    assert result.reconstructions == [SHORT] and result.rouge1 == 1.0


def test_combined_dropout_composes_the_embedding_and_lora_rates():
    def part(dropout: float) -> LoraPart:
        return LoraPart("q.lora_A.default", "q", "lora_A", "default", 16, 2.0, dropout)

    assert combined_dropout(0.1, part(0.1)) == pytest.approx(1 - 0.9 * 0.9)
    assert combined_dropout(0.0, part(0.1)) == pytest.approx(0.1)
    assert combined_dropout(0.1, part(0.0)) == 0.1
    assert combined_dropout(0.1, None) == 0.1


def with_lora_dropout(model, tokenizer, rate: float, steps: int = 5):
    """LoRA r = 16 on query and value with `lora_dropout=rate`, trained `steps` AdamW steps
    in train mode on SENTENCES (as `lora_model` does), returned in eval mode."""
    config = LoraConfig(
        r=16, target_modules=["query", "value"], lora_dropout=rate, task_type=TaskType.SEQ_CLS
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wrapped = get_peft_model(copy.deepcopy(model), config)
        optimiser = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
        wrapped.train()
        batch = make_batch(wrapped, tokenizer, TEXTS, labels_for(wrapped, LABELS))
        for _ in range(steps):
            wrapped(**batch).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
    return wrapped.eval()


@pytest.mark.slow
def test_train_mode_with_lora_dropout_recovers_the_sentence(minilm):
    model, tokenizer = minilm
    wrapped = with_lora_dropout(model, tokenizer, 0.1)
    (name,) = select_modules(wrapped, "query@0:lora_A")
    assert lora_part(wrapped, name).dropout == 0.1
    assert torch.any(lora_B_of(wrapped, name))
    for text in [SHORT, "a boring film with a bad plot"]:
        result = audit_batch(
            wrapped, tokenizer, [text], [1], "query@0:lora_A", "span", budget=0.01, train_mode=True
        )
        assert result.error is None
        assert result.info["train_mode"] is True
        assert result.info["regime"] == "span exact" and result.info["mode"] == "exact"
        assert result.info["lora_dropout"].startswith("lora_dropout 0.1 modelled")
        # Every input found under the composed mask rate 0.19 (with the embedding rate 0.1
        # alone, 2 of 7 inputs are found and the sentence is lost: measured).
        tokens = result.info["tokens"]
        assert result.info["inputs_found"] == result.info["inputs_expected"] == tokens
        assert result.info["explained_residual"] < 1e-5
        assert result.reconstructions == [text] and result.rouge1 == 1.0
