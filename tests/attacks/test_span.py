"""The span attack (exact mode), the spectrum it rests on, and `auto`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from gradaudit.attacks import get_attack
from gradaudit.attacks.base import candidate_token_ids, content_mask
from gradaudit.attacks.span.exact.membership import MEMBERSHIP_EXACT, Membership, assign
from gradaudit.attacks.span.exact.screening import (
    content_slots,
    extend_basis,
    known_inputs,
    slot_offsets,
    token_offsets,
)
from gradaudit.attacks.span.exact.search import Search
from gradaudit.attacks.span.exact.solve import verified_sentences
from gradaudit.attacks.span.exact.words import word_places
from gradaudit.errors import GradAuditError
from gradaudit.experiments.data import load_examples
from gradaudit.gradients.capture import capture
from gradaudit.gradients.spectrum import spectrum
from gradaudit.model.batch import make_batch
from gradaudit.model.families import layout

WORDS = (
    "the a movie film story plot actor cast music scene is was not very too quite good bad "
    "great awful boring charming funny dull long short slow and but it this of with"
).split()
BATCH = ["the movie was good", "a very boring plot", "this film is not funny", "too long and dull"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A random 2-layer BERT of width 64 over this file's words, and its tokenizer."""
    tokenizer = make_tiny_tokenizer(tmp_path_factory.mktemp("vocab"), WORDS)
    return make_tiny_model(len(tokenizer.get_vocab()), hidden=64), tokenizer


def run(model, tokenizer, texts, labels, module, attack="span", **options):
    batch = make_batch(model, tokenizer, texts, labels)
    snapshot = capture(model, batch, [module])
    result = get_attack(attack, **options).reconstruct(
        model, snapshot, tokenizer=tokenizer, device="cpu", budget=0.02
    )
    lengths = batch["attention_mask"].sum(1)
    truth = [ids[: int(n)].tolist() for ids, n in zip(batch["input_ids"], lengths)]
    return truth, result


def test_exact_recovers_one_sentence(tiny):
    # Query only: in a random model attention is near uniform, so layer-0 key and value
    # gradients are numerically near rank 1 (they are tested on MiniLM below).
    model, tokenizer = tiny
    module = layout(model).component_name("query", 0)
    truth, result = run(model, tokenizer, ["the charming cast and the music"], [1], module)
    assert result.token_ids == truth
    assert result.info["mode"] == "exact"
    assert result.info["slot_margin_min"] > 10  # next-best token's residual / the chosen one's
    assert result.info["spectra"][module]["rank"] == len(truth[0])


def test_exact_recovers_and_assigns_a_batch(tiny):
    model, tokenizer = tiny
    module = layout(model).component_name("query", 0)
    truth, result = run(model, tokenizer, BATCH, [1, 0, 0, 0], module)
    # Sentences of equal length and label are interchangeable in the gradient: compare sets.
    assert sorted(result.token_ids) == sorted(truth)
    assert result.info["gradient_residual"] < 1e-4


def test_chunk_size_does_not_change_the_result(tiny):
    model, tokenizer = tiny
    # Query: the tiny model's value@0 gradient is near rank 1 (see above), a span too thin
    # for the screening to show anything.
    module = layout(model).component_name("query", 0)
    texts = ["a funny story with a great cast"]
    truth, small = run(model, tokenizer, texts, [1], module, chunk=5)
    _, large = run(model, tokenizer, texts, [1], module, chunk=4096)
    assert small.token_ids == large.token_ids == truth


@pytest.mark.slow
@pytest.mark.parametrize("component", ["query", "key", "value"])
def test_exact_on_minilm_one_sentence(minilm, component):
    model, tokenizer = minilm
    module = layout(model).component_name(component, 0)
    text = "a gripping , tender and wholly original film about growing old ."
    truth, result = run(model, tokenizer, [text], [1], module)
    assert result.token_ids == truth
    assert result.texts[0] == tokenizer.decode(truth[0], skip_special_tokens=True)


def test_nan_gradient_is_a_clear_error():
    grad = torch.ones(4, 6)
    grad[1, 2] = float("nan")
    with pytest.raises(GradAuditError, match="NaN or inf"):
        spectrum(grad, name="layer.0.query")


def test_weaker_directions_past_the_largest_gap_are_counted_above_rounding():
    # One strong direction, five weak ones 1e7 below it, a noise bulk 1e5 below those filling
    # the rest of the spectrum (above float64 rounding, so it is the floor here): the
    # rank stops at the largest gap, rank_above_rounding at the last gap of at least min_gap.
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(60, 30, dtype=torch.float64, generator=generator)).Q
    values = torch.tensor([1.0] + [1e-7] * 5 + [1e-12] * 24, dtype=torch.float64)
    spec = spectrum(left @ torch.diag(values) @ right.T, min_gap=50.0)
    assert (spec.rank, spec.rank_above_rounding) == (1, 6)
    assert spec.summary()["rank_above_rounding"] == 6
    values[1:6] = 1e-5  # now the weak directions' own gap (1e7) is the largest: no ambiguity
    spec = spectrum(left @ torch.diag(values) @ right.T, min_gap=50.0)
    assert (spec.rank, spec.rank_above_rounding) == (6, 6)


def test_zero_gradient_says_nothing_to_recover(tiny):
    model, tokenizer = tiny
    module = layout(model).component_name("query", 0)
    batch = make_batch(model, tokenizer, ["the movie was good"], [1])
    snapshot = capture(model, batch, [module])
    snapshot.gradients = {k: torch.zeros_like(v) for k, v in snapshot.gradients.items()}
    result = get_attack("span").reconstruct(model, snapshot, tokenizer=tokenizer, device="cpu")
    assert "nothing to recover" in result.info["why"]
    assert result.texts == [""]


def test_saturated_gradient_is_reported(tiny):
    model, tokenizer = tiny
    module = layout(model).component_name("query", 0)
    batch = make_batch(model, tokenizer, ["the movie was good"], [1])
    snapshot = capture(model, batch, [module])
    weight = f"{module}.weight"
    snapshot.gradients[weight] = torch.randn_like(snapshot.gradients[weight])
    result = get_attack("span").reconstruct(model, snapshot, tokenizer=tokenizer, device="cpu")
    assert result.info["why"].startswith("saturated")
    assert result.info["mode"] == "none"


def test_last_layer_query_is_reported_rank_limited(tiny):
    model, tokenizer = tiny
    module = layout(model).component_name("query", 1)
    _, result = run(model, tokenizer, BATCH[:2], [1, 0], module)
    assert result.info["labels"][module] == "rank-limited"
    assert "[CLS]" in result.info["why"]
    assert result.texts == ["", ""]


def test_auto_runs_exact_span_at_layer_0_and_deep_span_past_it(tiny):
    model, tokenizer = tiny
    lay = layout(model)
    truth, exact = run(model, tokenizer, BATCH[:1], [1], lay.component_name("key", 0), "auto")
    assert exact.info["auto"]["ran"] == "span"
    assert exact.token_ids == truth
    _, deep = run(model, tokenizer, BATCH[:1], [1], lay.component_name("value", 1), "auto")
    assert deep.info["auto"]["ran"] == "span" and deep.info["mode"] == "deep"
    assert "labels" in deep.info["auto"]


def test_unknown_saturated_choice_is_an_error():
    with pytest.raises(GradAuditError, match="saturated"):
        get_attack("span", saturated="maybe")


@pytest.mark.slow
@pytest.mark.parametrize("component", ["query", "key"])
def test_exact_on_minilm_batch_of_four(minilm, component):
    # Near the rank ceiling the row space fits a true word at a wrong position as well as the
    # truth, so this rests on the attention membership test and the label-ordered check.
    model, tokenizer = minilm
    module = layout(model).component_name(component, 0)
    truth, result = run(model, tokenizer, BATCH, [1, 0, 0, 0], module)
    assert sorted(result.token_ids) == sorted(truth)
    assert result.token_ids[0] == truth[0]  # the only label-1 sentence keeps its row
    assert result.info["gradient_residual"] < 1e-4


@pytest.mark.slow
def test_exact_on_minilm_batch_of_four_lengths(minilm):
    model, tokenizer = minilm
    module = layout(model).component_name("query", 0)
    texts = ["it is good", "a bad film indeed", "the plot was very very dull"]
    texts.append("this cast is not funny at all , sadly")
    truth, result = run(model, tokenizer, texts, [1, 0, 0, 0], module)
    assert result.token_ids == truth


def _query_membership(model, tokenizer, texts):
    module_name = layout(model).component_name("query", 0)
    batch = make_batch(model, tokenizer, texts, [1] * len(texts))
    target = capture(model, batch, [module_name]).weight_gradient(module_name)
    return batch, Membership.build(model, model.get_submodule(module_name), batch, target)


def test_rows_on_an_exact_input_dependency_go_untested(tiny):
    # good/bad swap positions 3 and 4 between two sentences, dull/slow between two others:
    # two such cycles make the eight inputs linearly dependent (LayerNorm's scale aside, each
    # cycle sums to a multiple of beta), so their share of the gradient is not determined.
    model, tokenizer = tiny
    texts = ["the movie good bad", "a film bad good", "it is dull slow", "this plot slow dull"]
    batch, membership = _query_membership(model, tokenizer, texts)
    state = membership.signals(batch["input_ids"])
    cycle = {tokenizer.convert_tokens_to_ids(w) for w in ("good", "bad", "dull", "slow")}
    for b, rows in enumerate(state.rows):
        for column, row in enumerate(rows):
            on_cycle = int(batch["input_ids"][b, column]) in cycle and column in (3, 4)
            assert bool(state.dependent[row]) == on_cycle
    assert bool(state.shared[state.rows[0][0]])  # [CLS] at position 0 is every sentence's


@pytest.mark.slow
def test_annealing_assigns_shuffled_tokens_to_their_sentences(minilm):
    model, tokenizer = minilm
    texts = [
        "a charming and funny film",
        "the plot is thin but the cast is wonderful",
        "it drags",
        "an honest , moving story about two brothers who never met",
    ]
    batch, membership = _query_membership(model, tokenizer, texts)
    truth = batch["input_ids"]
    own, _, shared = membership.score(membership.signals(truth))
    assert sum(own) + shared < MEMBERSHIP_EXACT
    content = batch["attention_mask"].bool() & (truth != tokenizer.cls_token_id)
    content &= truth != tokenizer.sep_token_id
    slots = content_slots(batch, content, layout(model))
    pools = [truth[list(slot.sentences), slot.column] for slot in slots]
    generator = torch.Generator().manual_seed(0)
    found, score = assign(membership, truth, slots, pools, generator)  # starts shuffled
    assert score < MEMBERSHIP_EXACT
    assert torch.equal(found, truth)


def test_rank_drop_verifies_exact_sentences_and_no_wrong_one(tiny):
    model, tokenizer = tiny
    module = layout(model).component_name("query", 0)
    batch = make_batch(model, tokenizer, BATCH, [1, 0, 0, 0])
    target = capture(model, batch, [module]).weight_gradient(module)
    spec = spectrum(target)
    special = torch.tensor(tokenizer.all_special_ids)
    content = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special)
    search = Search(model, model.get_submodule(module), batch, target, forward_batch=8)
    ids = batch["input_ids"].clone()
    everyone = list(range(len(ids)))
    assert verified_sentences(search.gradients(everyone, ids), target, spec, content) == everyone
    ids[1, 2] = tokenizer.convert_tokens_to_ids("good")  # "a good boring plot"
    verified = verified_sentences(search.gradients(everyone, ids), target, spec, content)
    assert verified == [0, 2, 3]


@pytest.mark.slow
def test_exact_peels_verified_sentences_and_solves_the_rest(minilm, sst2_path):
    # SST-2 dev sentences 4-7 (13, 25, 8 and 15 tokens): the joint search gets three right and
    # the 25-token one wrong (ROUGE-1 0.95, gradient residual 0.32); taken off the gradient,
    # the three leave one sentence, which the row space decides alone.
    truth, result = run_sst2(minilm, sst2_path, 1, "query")
    assert result.info["peeled"]
    assert result.token_ids == truth
    assert result.info["gradient_residual"] < 1e-4


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.xfail(
    strict=False,
    reason="rounding-dependent: exact on the machines of earlier sessions; on an AMD EPYC "
    "(2026-12-07, also at aabd78c) the search ends at a wrong local optimum, gradient residual "
    "0.198: an open miss of the eval-mode target (docs/span-measurements.md)",
)
def test_eval_mode_value_batch_starts_from_its_signals_cohesion(minilm, sst2_path):
    # SST-2 dev sentences 0-3: from the slots' pools in screening order the coordinate search
    # ended at ROUGE-1 0.54 (gradient residual 0.79); sorted by the signals' cohesion first,
    # the gradient match is exact. On one thread, as the bench runs: with two the rounding
    # differs and the search ends at a wrong pair ("is '" for "' s", residual 0.20).
    truth, result = run_sst2(minilm, sst2_path, 0, "value")
    assert result.token_ids == truth
    assert result.info["gradient_residual"] < 1e-4


def run_sst2(minilm, sst2_path, index, component):
    """`run` on SST-2 dev's batch of four number `index` at `component`@0."""
    model, tokenizer = minilm
    texts, labels = load_examples(str(sst2_path)).batches(4, index + 1)[index]
    return run(model, tokenizer, texts, labels, layout(model).component_name(component, 0))


def split_words(model, tokenizer, texts, module):
    """`word_places` on a captured batch of `texts`, with the batch and its content slots."""
    lay = layout(model)
    batch = make_batch(model, tokenizer, texts, [1] * len(texts))
    snapshot = capture(model, batch, [module])
    target = snapshot.weight_gradient(module).double()
    content = content_mask(snapshot, tokenizer)
    special = batch["attention_mask"].bool() & ~content
    cpu = torch.device("cpu")
    basis = extend_basis(spectrum(target).basis, known_inputs(lay, batch, special, cpu))
    slots = content_slots(batch, content, lay)
    places = word_places(
        lay,
        target,
        basis,
        slots,
        batch["input_ids"][special],
        token_offsets(lay, batch, special, cpu),
        slot_offsets(lay, slots, cpu),
        candidate_token_ids(tokenizer),
        chunk=7,
    )
    return batch, slots, places


def test_word_split_finds_every_word_and_places_words_met_once(tiny):
    # Every content word of BATCH occurs once, so the regression places all of them.
    model, tokenizer = tiny
    module = layout(model).component_name("query", 0)
    batch, slots, places = split_words(model, tokenizer, BATCH, module)
    ids = batch["input_ids"]
    assert set(places.words.tolist()) == set(ids[batch["attention_mask"].bool()].tolist())
    for slot, placed in zip(slots, places.placed):
        assert sorted(placed) == sorted(int(ids[b, slot.column]) for b in slot.sentences)
    assert places.leftover == []


@pytest.mark.slow
def test_word_split_on_sst2_sentences_that_defeat_the_row_space(minilm, sst2_path):
    # SST-2 dev sentences 12-15 (25-29 tokens): the row space admits 53 words at most slots,
    # but the split proves the 73 words that occur and places 47 tokens, each where it sits.
    model, tokenizer = minilm
    texts, _ = load_examples(str(sst2_path)).batches(4, 4)[3]
    module = layout(model).component_name("query", 0)
    batch, slots, places = split_words(model, tokenizer, texts, module)
    ids = batch["input_ids"]
    assert set(places.words.tolist()) == set(ids[batch["attention_mask"].bool()].tolist())
    for slot, placed in zip(slots, places.placed):
        assert set(placed) <= {int(ids[b, slot.column]) for b in slot.sentences}
    assert sum(map(len, places.placed)) >= 40
