"""Exact mode on train-mode gradients: dropout masks found in the span (issue 23)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from test_span import BATCH, WORDS
from torch import nn

from gradaudit.attacks import get_attack
from gradaudit.attacks.span.exact.dropout import Finder, FoundRows, embedding_dropout
from gradaudit.attacks.span.exact.keys import anchor_index
from gradaudit.attacks.span.exact.masks import (
    MASK_EXACT,
    MaskFit,
    decode_masks,
    descend_masks,
    masked_residual,
    most_dropped,
)
from gradaudit.attacks.span.exact.screening import Slot, layer0_inputs
from gradaudit.gradients.capture import capture
from gradaudit.gradients.spectrum import spectrum
from gradaudit.model.batch import make_batch
from gradaudit.model.families import layout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A random 2-layer BERT of width 96 (dropout 0.1, BERT's default) and its tokenizer."""
    tokenizer = make_tiny_tokenizer(tmp_path_factory.mktemp("vocab"), WORDS)
    return make_tiny_model(len(tokenizer.get_vocab()), hidden=96), tokenizer


def run(model, tokenizer, texts, component="query", seed=5):
    batch = make_batch(model, tokenizer, texts, [1] * len(texts))
    module = layout(model).component_name(component, 0)
    snapshot = capture(model, batch, [module], train_mode=True, seed=seed)
    result = get_attack("span").reconstruct(
        model, snapshot, tokenizer=tokenizer, device="cpu", budget=0.02
    )
    lengths = batch["attention_mask"].sum(1)
    truth = [ids[: int(n)].tolist() for ids, n in zip(batch["input_ids"], lengths)]
    return truth, result


def test_dropout_is_read_from_the_model(tiny):
    model, _ = tiny
    assert embedding_dropout(layout(model)) == (0.1, "")


@pytest.mark.parametrize("component", ["query", "value"])
def test_train_mode_recovers_one_sentence(tiny, component):
    model, tokenizer = tiny
    truth, result = run(model, tokenizer, ["the charming cast and the music"], component)
    assert result.token_ids == truth
    assert result.info["train_mode"] is True
    assert result.info["inputs_found"] == result.info["inputs_expected"] == len(truth[0])
    assert result.info["explained_residual"] < 1e-5


def test_train_mode_recovers_and_assigns_a_batch_of_four(tiny):
    model, tokenizer = tiny
    truth, result = run(model, tokenizer, BATCH)
    assert sorted(result.token_ids) == sorted(truth)
    assert result.info["assignment"] == "membership"
    assert result.info["membership_score"] < 1e-6
    assert result.info["explained_residual"] < 1e-5
    # Each sentence found by a search of its own; three of one length, which the search
    # cannot tell apart, each claim a different one.
    assert result.info["sentences_solved_alone"] == 4


def test_query_rows_are_sorted_into_sentences_with_inputs_missing_their_places_left_empty(
    tiny, monkeypatch
):
    """Where the mask search leaves inputs unfound (wide spans), the membership test still
    sorts the found ones: the missing rows' signals land on their neighbours' only partly."""
    import gradaudit.attacks.span.exact.train as train

    model, tokenizer = tiny
    lost = {tokenizer.convert_tokens_to_ids(w) for w in ("was", "not")}
    find_rows = train.find_rows

    def losing(*args, **kwargs):
        found = find_rows(*args, **kwargs)
        keep = [i for i, t in enumerate(found.tokens) if t not in lost]
        fields = found.__dataclass_fields__
        return FoundRows(*([getattr(found, f)[i] for i in keep] for f in fields))

    monkeypatch.setattr(train, "find_rows", losing)
    truth, result = run(model, tokenizer, BATCH)
    holes = [[0 if t in lost else t for t in ids] for ids in truth]
    assert sorted(result.token_ids) == sorted(holes)
    assert result.info["inputs_found"] == result.info["inputs_expected"] - 2
    assert result.info["assignment"] == "membership (2 inputs missing: their places are left empty)"


def test_train_mode_sorts_a_value_batch_of_four_by_its_signals_cohesion(tiny):
    model, tokenizer = tiny
    truth, result = run(model, tokenizer, BATCH, "value")
    assert sorted(result.token_ids) == sorted(truth)
    assert result.info["assignment"] == "signal cohesion"
    assert result.info["cohesion_margin"] > 0
    assert result.info["explained_residual"] < 1e-5


def test_the_descent_makes_a_true_tokens_mask_exact_and_leaves_a_false_one_far(tiny):
    model, tokenizer = tiny
    lay = layout(model)
    batch = make_batch(model, tokenizer, ["the charming cast and the music"], [1])
    module = lay.component_name("query", 0)
    snapshot = capture(model, batch, [module], train_mode=True, seed=5)
    basis = spectrum(snapshot.weight_gradient(module)).basis.double()
    offsets = (lay.position_embeddings.weight[2] + lay.token_type_embeddings.weight[0]).detach()
    true, false = batch["input_ids"][0, 2], tokenizer.convert_tokens_to_ids("boring")
    rows = layer0_inputs(lay, torch.tensor([true, false]), offsets.double().expand(2, -1)) / 0.9
    width, most = basis.shape[1], most_dropped(basis.shape[1], 0.1)
    start = torch.rand(2, width, generator=torch.Generator().manual_seed(0)) >= 0.3
    before = masked_residual(rows, start, basis, most)
    fit = descend_masks(MaskFit(before, start), rows, basis, most)
    assert before[0] > 0.1  # a random mask: far from the span
    assert fit.residual[0] < MASK_EXACT < 0.05 < fit.residual[1]
    assert (~fit.kept[0]).sum() < 0.25 * width  # about p x width coordinates dropped


def test_a_key_rows_anchor_that_dropped_its_outlier_coordinate_is_decoded():
    # A first-token input with one coordinate far above the rest (MiniLM's: 7.04, median
    # 0.07); sentence 0's first-token mask dropped it, the two others kept it.
    g = torch.Generator().manual_seed(0)
    width, most = 96, most_dropped(96, 0.1)
    anchor = torch.randn(width, generator=g, dtype=torch.float64) * 0.3
    anchor[5] = 8.0
    rows, tokens = [], None
    for sentence in range(3):
        anchor_kept = torch.rand(width, generator=g, dtype=torch.float64) >= 0.1
        anchor_kept[5] = sentence != 0
        u = torch.randn(12, width, generator=g, dtype=torch.float64)
        kept = torch.rand(12, width, generator=g, dtype=torch.float64) >= 0.1
        rows.append(u * kept - anchor * anchor_kept)
        tokens = u if sentence == 0 else tokens
    basis = torch.linalg.qr(torch.cat(rows).T).Q.T
    plain = decode_masks(tokens, basis, most, anchor)
    plain = descend_masks(plain, tokens, basis, most, anchor)
    assert (plain.residual < MASK_EXACT).sum() == 0  # the l1 decoding spreads the big error
    fit = Finder(basis, most, anchor).rank(tokens)
    assert bool((fit.residual < MASK_EXACT).all()) and not fit.anchor_kept[:, 5].any()


class DropoutFirst(nn.Module):
    """Embeddings with dropout before the LayerNorm: a layout the robust test cannot model."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.inner = embeddings

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None, **kwargs):
        e = self.inner
        words = e.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        positions = torch.arange(words.shape[1], device=words.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros(words.shape[:2], dtype=torch.long, device=words.device)
        z = words + e.position_embeddings(positions)
        return e.LayerNorm(e.dropout(z + e.token_type_embeddings(token_type_ids)))


def test_a_found_tokens_second_mask_is_found_by_pricing_its_first_masks_drops():
    """Two sentences hold one token at one slot, each with its own dropout mask: with one mask
    found, the box relaxation pricing that mask's dropped coordinates finds the other."""
    from gradaudit.attacks.span.exact.dropout import other_masks

    generator = torch.Generator().manual_seed(0)
    width = 96
    u = torch.randn(width, generator=generator, dtype=torch.float64)
    draws = torch.rand(2, width, generator=generator)
    first, second = draws[0] >= 0.05, draws[1] >= 0.15  # the relaxation prefers fewer drops
    others = torch.randn(30, width, generator=generator, dtype=torch.float64)
    span = torch.cat([(u * first)[None], (u * second)[None], others])
    basis = torch.linalg.qr(span.T).Q.T
    finder = Finder(basis, most_dropped(width, 0.1), None)
    chosen = {0: [(first, None)]}
    other_masks(finder, u[None], chosen, count=2)
    assert len(chosen[0]) == 2
    assert torch.equal(chosen[0][1][0], second)


def test_dropout_it_cannot_model_is_said_and_not_trusted(tiny, tmp_path):
    model, tokenizer = tiny
    other = make_tiny_model(model.config.vocab_size, hidden=96)
    wrapped = DropoutFirst(other.bert.embeddings)
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        wrapped.add_module(name, getattr(other.bert.embeddings, name))
    other.bert.embeddings = wrapped
    rate, why = embedding_dropout(layout(other))
    assert rate == 0.1 and "not LayerNorm's output" in why
    _, result = run(other, tokenizer, ["the charming cast"])
    assert result.info["mode"] == "deep"
    assert "cannot model" in result.info["dropout"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("component", "assignment"),
    [("query", "membership"), ("key", "first-token masks"), ("value", "signal cohesion")],
)
def test_train_mode_batch_of_four_on_minilm(
    minilm, sst2_path, one_torch_thread, component, assignment
):
    from gradaudit.experiments.data import load_examples

    model, tokenizer = minilm
    examples = load_examples(str(sst2_path))
    truth, result = run(model, tokenizer, examples.texts[:4], component, seed=7)
    assert sorted(result.token_ids) == sorted(truth)
    assert result.info["inputs_found"] == result.info["inputs_expected"] == 74
    assert result.info["explained_residual"] < 1e-5
    assert result.info["assignment"] == assignment
    if component == "value":
        assert result.info["cohesion_margin"] > 0.05  # 0.083 measured
    else:
        assert result.info["membership_score"] < 1e-6


def test_a_saturated_batch_is_stated_not_scored_as_safe(tmp_path):
    tokenizer = make_tiny_tokenizer(tmp_path, WORDS)
    narrow = make_tiny_model(len(tokenizer.get_vocab()), hidden=32)
    texts = [t + " and the music" for t in BATCH]  # 40 tokens with dropout: 40 inputs > 32
    truth, result = run(narrow, tokenizer, texts)
    statement = result.info["saturation"]
    assert result.info["mode"] == "none" and result.info["why"].startswith("saturated")
    assert statement["inputs"] == sum(map(len, truth)) > statement["width"] == 32
    assert statement["not_identified"] == ["words", "their positions", "their sentences"]
    assert statement["identified"]["sentence_lengths"] == [len(t) for t in truth]
    assert "not evidence that the batch is safe" in statement["statement"]
    # Its claim: one sentence at a time is recovered exactly from the same module.
    one, alone = run(narrow, tokenizer, texts[:1])
    assert alone.token_ids == one and "saturation" not in alone.info


def test_a_training_loops_gradient_is_attacked_with_dropout_on_by_an_eval_mode_model(
    tiny, tmp_path
):
    """The Auditor snapshots `.grad` after the loop's own backward (model in training mode);
    its worker attacks with a rebuilt model in eval mode: the snapshot must say dropout was on."""
    from gradaudit.gradients.snapshot import GradientSnapshot

    model, tokenizer = tiny
    batch = make_batch(model, tokenizer, ["the charming cast and the music"], [1])
    module = layout(model).component_name("query", 0)
    model.train()
    torch.manual_seed(3)
    model(**batch).loss.backward()
    snapshot = GradientSnapshot.from_grads(model, batch, [module])
    model.zero_grad()
    model.eval()
    snapshot.save(tmp_path / "step")
    loaded = GradientSnapshot.load(tmp_path / "step", model)
    result = get_attack("span").reconstruct(
        model, loaded, tokenizer=tokenizer, device="cpu", budget=0.02
    )
    assert loaded.meta["train_mode"] is True
    assert result.info["train_mode"] is True
    assert result.token_ids == [batch["input_ids"][0].tolist()]


def test_an_assignment_between_sentences_longer_than_a_head_is_called_a_ranking(tiny):
    from transformers import BertConfig, BertForSequenceClassification

    _, tokenizer = tiny
    config = BertConfig(  # 8 heads of 24, wide enough for 50 dropped-out inputs
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=8,
        intermediate_size=384,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    long_one, long_two = " ".join(WORDS[:23]), " ".join(WORDS[-23:])  # 25 tokens each
    _, result = run(model, tokenizer, [long_one, long_two])
    assert result.info["inputs_found"] == result.info["inputs_expected"] == 50
    assert result.info["assignment"] == (
        "membership (windowed between sentences [0, 1], longer than a head: a ranking, not exact)"
    )


def test_key_rows_of_a_wide_span_are_placed_by_their_first_token_masks_as_far_as_found():
    # Three sentences (lengths 4, 4, 3; [SEP] = 9): sentence 0 complete, one sentence of
    # length 4 with its [SEP] unfound, the third with no row found.
    masks = torch.eye(3, 64, dtype=torch.bool).repeat_interleave(20, 1)[:, :64]
    slots = [Slot(c, c, 0, (0, 1, 2) if c < 3 else (0, 1)) for c in range(4)]
    rows = [(1, 5, 0), (2, 6, 0), (3, 9, 0), (0, 1, 1), (1, 7, 1), (2, 8, 1), (0, 1, 0)]
    found = FoundRows(
        tokens=[t for _, t, _ in rows], slots=[j for j, _, _ in rows],
        inputs=[torch.zeros(64)] * len(rows), anchors=[masks[g] for _, _, g in rows],
    )  # fmt: skip
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]])
    index, note = anchor_index(found, attention, slots, ends={3: 9, 2: 9})
    assert index[0].tolist() == [6, 0, 1, 2]  # its [SEP] found: sure
    assert index[1].tolist() == [3, 4, 5, -1] and (index[2] == -1).all()
    assert "1 of 2 sentences placed by length, a guess" in note
    assert "4 inputs missing" in note and "1 sentences with no row found" in note
