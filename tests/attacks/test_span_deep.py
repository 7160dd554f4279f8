"""Deep span mode on the tiny random BERT (2 layers, width 48): modules past layer 0."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from gradaudit.attacks import get_attack
from gradaudit.attacks.base import candidate_token_ids, content_mask
from gradaudit.attacks.span.attack import module_spectra
from gradaudit.attacks.span.deep import descent as span_descent
from gradaudit.attacks.span.deep import search as span_search
from gradaudit.attacks.span.deep.continuous import (
    KICK,
    LR_SPREAD,
    kicked_start,
    nearest,
    optimise_embeddings,
    slot_optima,
)
from gradaudit.attacks.span.deep.descent import (
    ROUGH_KEEP,
    coordinate_descent,
    open_sentences,
    take_best,
)
from gradaudit.attacks.span.deep.moves import (
    first_order_change,
    first_order_gain,
    insertion_shifts,
    promising,
    reorderings,
    score_gradient,
    shifted_insertions,
)
from gradaudit.attacks.span.deep.objective import (
    SENTENCE_FITS,
    SOLVED,
    DeepSettings,
    SpanObjective,
)
from gradaudit.attacks.span.deep.search import SEARCHES, deep_search, search_sentences_again
from gradaudit.errors import GradAuditError
from gradaudit.gradients.capture import capture
from gradaudit.model.batch import make_batch
from gradaudit.model.families import layout
from gradaudit.scoring.audit import score_reconstruction

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
    with pytest.raises(GradAuditError, match="rough_dtype='int8': choose one of auto, none"):
        get_attack("span", rough_dtype="int8")


@pytest.mark.parametrize("rough", ["bfloat16", "none"])
def test_deep_recovers_a_sentence_with_or_without_a_rough_objective(model, tiny_tokenizer, rough):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    result = get_attack("span", rough_dtype=rough).reconstruct(
        model, snapshot, tokenizer=tiny_tokenizer, device="cpu", budget=0.3
    )
    assert result.info["rough_dtype"] == rough
    assert result.token_ids == truth_of(snapshot)
    assert result.info["residual"] < SOLVED


def objective_of(model, tokenizer, snapshot, rough=None):
    cpu = torch.device("cpu")
    bases = {m: s.basis for m, s in module_spectra(model, snapshot, 50.0, cpu).items()}
    content = content_mask(snapshot, tokenizer)
    return SpanObjective(model, layout(model), snapshot, bases, content, cpu, rough)


def rough_take_best(objective, truth, position, wrong_token, candidates):
    """`take_best` over `candidates` at `position` of `truth` (the last one replaced by the
    truth) from `wrong_token` there; its ids and score and how many it scored at full
    precision."""
    wrong = truth.clone()
    wrong[0, position] = wrong_token
    trial = wrong.repeat(len(candidates), 1, 1)
    trial[:, 0, position] = candidates
    trial[-1] = truth
    full = []
    score_variants = objective.score_variants
    objective.score_variants = lambda ids, b, variants, per_pass: (
        full.append(len(variants)) or score_variants(ids, b, variants, per_pass)
    )
    current = objective.score_ids(wrong.unsqueeze(0), 1)[0]
    found, score = take_best(objective, trial, 8, wrong, current)
    return found, score, sum(full)


def test_a_rough_objective_that_cannot_tell_candidates_apart_leaves_all_to_full_precision(
    model, tiny_tokenizer
):
    # The tiny random model's query@1 scores one wrong token ~1e-6: below bfloat16's precision.
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "query")
    objective = objective_of(model, tiny_tokenizer, snapshot, torch.bfloat16)
    truth = snapshot.batch["input_ids"]
    candidates = torch.arange(40, 40 + 4 * ROUGH_KEEP)
    found, score, full = rough_take_best(objective, truth, 2, 18, candidates)
    assert torch.equal(found, truth)
    assert float(score) == float(objective.score_ids(truth.unsqueeze(0), 1)[0]) < SOLVED
    assert float(objective.rough.score_ids(truth.unsqueeze(0), 1)[0]) > SOLVED  # rough: no ~0
    assert full == len(candidates)


def test_a_rough_objective_leaves_few_candidates_to_full_precision_on_minilm(minilm):
    model, tokenizer = minilm
    text = "a charming and often affecting journey ."
    snapshot = snapshot_of(model, tokenizer, [text], "query", 2)
    objective = objective_of(model, tokenizer, snapshot, torch.bfloat16)
    truth = snapshot.batch["input_ids"]
    candidates = candidate_token_ids(tokenizer)[1000:1064]
    found, score, full = rough_take_best(objective, truth, 3, 2000, candidates)
    assert torch.equal(found, truth) and float(score) < SOLVED
    assert full < len(candidates) // 4


def test_scoring_one_changed_sentence_alone_equals_scoring_the_whole_batch(model, tiny_tokenizer):
    # In float64: a float32 forward over fewer positions rounds differently, and the subspace
    # residual magnifies that to ~3e-5 relative on some CPUs, which is rounding, not a mismatch.
    model = copy.deepcopy(model).double()
    texts = ["the charming cast and the music", "a very boring plot"]
    snapshot = snapshot_of(model, tiny_tokenizer, texts, "query")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    ids = snapshot.batch["input_ids"]
    others = [v for v in candidate_token_ids(tiny_tokenizer).tolist() if v != ids[1, 2]][:4]
    variants = ids[1].repeat(5, 1)
    variants[:, 2] = torch.tensor([*others, int(ids[1, 2])])
    whole = ids.repeat(5, 1, 1)
    whole[:, 1] = variants
    alone = objective.score_variants(ids, 1, variants, per_pass=2)
    assert torch.allclose(alone, objective.score_ids(whole, per_pass=2), rtol=1e-6, atol=1e-9)
    assert float(alone[-1]) < 1e-8 < float(alone[:-1].min())  # only the truth scores ~0


def test_scoring_variants_of_a_one_sentence_batch_equals_scoring_them_as_batches(
    model, tiny_tokenizer
):
    snapshot = snapshot_of(model, tiny_tokenizer, ["a very boring plot"], "query")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    ids = snapshot.batch["input_ids"]
    variants = ids[0].repeat(4, 1)
    variants[:3, 2] = torch.tensor([40, 41, 42])
    alone = objective.score_variants(ids, 0, variants, per_pass=2)
    assert torch.allclose(alone, objective.score_ids(variants.unsqueeze(1), per_pass=2))
    assert float(alone[-1]) < 1e-8 < float(alone[:-1].min())


def test_a_short_sentence_of_a_batch_runs_forward_without_the_batch_padding(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT, "a plot"], "query")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    ids, real = snapshot.batch["input_ids"], snapshot.batch["attention_mask"].bool()
    widths = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        alone = objective.module_inputs(objective.embed(ids[1:]).unsqueeze(0), [1])
        whole = objective.module_inputs(objective.embed(ids).unsqueeze(0))
    finally:
        handle.remove()
    assert widths == [int(real[1].sum()), ids.shape[1]]
    for name, x in alone.items():
        assert x.shape == whole[name][:, 1:].shape
        assert torch.allclose(x[0, 0, real[1]], whole[name][0, 1, real[1]], atol=1e-6)
        assert not x[0, 0, ~real[1]].any()  # padding: zero inputs, which no score reads


def test_scoring_variants_of_a_one_sentence_batch_equals_scoring_them_whole(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    ids = snapshot.batch["input_ids"]
    variants = ids.repeat(4, 1)
    variants[:3, 2] = torch.tensor([40, 41, 42])
    alone = objective.score_variants(ids, 0, variants, per_pass=2)
    assert torch.allclose(alone, objective.score_ids(variants.unsqueeze(1), 2), atol=1e-12)
    assert float(alone[-1]) < 1e-8 < float(alone[:-1].min())


def test_reorderings_exchange_phrases_of_up_to_three_tokens():
    mask = torch.tensor([[False, True, True, True, True, True, False]])
    tokens = torch.tensor([[0, 11, 12, 13, 14, 15, 0]])
    orders = {tuple(tokens.flatten()[p].tolist()) for p in reorderings(mask)}
    assert (0, 14, 13, 11, 12, 15, 0) in orders  # "11 12" and "14" change places
    assert (0, 13, 14, 15, 12, 11, 0) in orders  # "11 12" and "13 14 15"
    assert (0, 12, 11, 13, 14, 15, 0) in orders  # a plain swap
    assert all(sorted(o) == sorted(tokens.flatten().tolist()) for o in orders)


def test_insertions_delete_one_token_and_insert_another_in_the_same_sentence(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, ["the charming cast and the music"], "query")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    ids = snapshot.batch["input_ids"]
    settings = DeepSettings(
        steps=0, restarts=1, lr=0.05, neighbours=4, bag=1, linearised=4, screen=4, inserts=3,
        sweeps=1, moves=10_000, forward_batch=8,
    )  # fmt: skip
    candidates = candidate_token_ids(tiny_tokenizer)
    shifts = insertion_shifts(objective.content)
    trials = shifted_insertions(
        objective, ids, shifts, objective.embed(candidates), candidates, settings,
        torch.Generator(),
    )  # fmt: skip
    content = ids[0, 1:-1].tolist()
    shifts = len(content) * (len(content) - 1)  # delete at i, insert at j != i
    assert len(trials) == shifts * settings.inserts
    for trial in trials:
        assert torch.equal(trial[0, [0, -1]], ids[0, [0, -1]])  # special tokens stay
        kept = trial[0, 1:-1].tolist()
        assert any(  # deleting one token of the truth and one of the trial leaves equal runs
            content[:i] + content[i + 1 :] == kept[:j] + kept[j + 1 :]
            for i in range(len(content))
            for j in range(len(kept))
        )


def test_first_order_ranks_the_reordering_that_restores_a_sentence_near_the_top(
    model, tiny_tokenizer
):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    truth = snapshot.batch["input_ids"]
    perms = reorderings(objective.content)
    ranks = []
    for perm in perms[torch.randperm(len(perms), generator=torch.Generator().manual_seed(0))][:20]:
        wrong = truth.flatten()[perm].view_as(truth)
        if torch.equal(wrong, truth):
            continue  # swapped the two "the"
        change = first_order_change(first_order_gain(objective, wrong)[1], perms)
        ranked = wrong.flatten()[perms[change.argsort()]].view(len(perms), *truth.shape)
        ranks.append(int((ranked == truth).flatten(1).all(1).nonzero()[0]))
    near_top = sum(rank < len(perms) // 4 for rank in ranks)
    assert near_top >= 15, ranks  # chance would put a quarter of them there


def test_promising_moves_are_the_first_order_best_half_and_a_random_rest():
    change = torch.tensor([5.0, -3.0, 0.0, -9.0, 2.0, 1.0, -1.0, 4.0])
    chosen = promising(change, 4, torch.Generator().manual_seed(0))
    assert chosen[:2].tolist() == [3, 1]  # the two best to first order
    assert len(set(chosen.tolist())) == 4
    drawn = {
        i for seed in range(20)
        for i in promising(change, 4, torch.Generator().manual_seed(seed))[2:].tolist()
    }  # fmt: skip
    assert drawn == {0, 2, 4, 5, 6, 7}  # every other move is reachable
    assert sorted(promising(change, 8, torch.Generator()).tolist()) == list(range(8))


def discrete_from(objective, wrong, source, candidates, settings):
    """`coordinate_descent` from ids `wrong` (B, L) whose continuous source is `source`."""
    raw = objective.embed(candidates)
    current = objective.score_ids(wrong.unsqueeze(0), 1)[0]
    return coordinate_descent(
        objective, wrong, current, source, F.normalize(raw, dim=-1), raw, candidates, settings,
        1, torch.Generator(),
    )  # fmt: skip


def test_a_stuck_sweep_widens_the_linearised_tokens(model, tiny_tokenizer, monkeypatch):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "query")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    truth = snapshot.batch["input_ids"]
    wrong = truth.clone()
    wrong[0, 2] = 18  # the true token ranks 4th to first order here: beyond linearised=1
    candidates = candidate_token_ids(tiny_tokenizer)
    settings = DeepSettings(
        steps=0, restarts=1, lr=0.05, neighbours=1, bag=0, linearised=1, screen=0, inserts=0,
        sweeps=10, moves=0, forward_batch=8,
    )  # fmt: skip

    def search():
        return discrete_from(objective, wrong, objective.embed(wrong), candidates, settings)

    found, score, sweeps = search()
    assert torch.equal(found, truth) and float(score) < SOLVED and sweeps == 2
    monkeypatch.setattr(span_descent, "WIDEST", 1)
    assert not torch.equal(search()[0], truth)  # without widening the sweep is stuck


def test_a_sweep_stops_at_the_position_that_solves_it(model, tiny_tokenizer, monkeypatch):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "query")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    truth = snapshot.batch["input_ids"]
    wrong = truth.clone()
    wrong[0, 1] = 18  # only the first content token is wrong
    candidates = candidate_token_ids(tiny_tokenizer)
    settings = settings_of(steps=0, sweeps=3, moves=64, inserts=2)
    tried = []

    def counted(objective, trial, *args):
        tried.append(len(trial))
        return take_best(objective, trial, *args)

    take_best = span_descent.take_best
    monkeypatch.setattr(span_descent, "take_best", counted)
    found, score, sweeps = discrete_from(
        objective, wrong, objective.embed(truth), candidates, settings
    )
    assert torch.equal(found, truth) and float(score) < SOLVED and sweeps == 1
    assert len(tried) == 1  # no other position, reordering or insertion was scored


def test_a_sweep_stuck_at_the_widest_first_order_ranks_refines_each_slot(
    model, tiny_tokenizer, monkeypatch
):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "query")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    truth = snapshot.batch["input_ids"]
    wrong = truth.clone()
    wrong[0, 2] = 18  # the true token ranks 4th to first order: beyond linearised=1
    candidates = candidate_token_ids(tiny_tokenizer)
    monkeypatch.setattr(span_descent, "WIDEST", 1)  # no widening: stuck at once

    def search(steps):
        settings = DeepSettings(
            steps=steps, restarts=1, lr=0.05, neighbours=1, bag=0, linearised=1, screen=0,
            inserts=0, sweeps=10, moves=0, forward_batch=8,
        )  # fmt: skip
        return discrete_from(objective, wrong, objective.embed(wrong), candidates, settings)

    found, score, sweeps = search(steps=300)
    assert torch.equal(found, truth) and float(score) < SOLVED and sweeps == 2
    assert not torch.equal(search(steps=0)[0], truth)  # no Adam steps: no refinement


def minilm_attn_output4(minilm, text, stuck):
    """Objective of MiniLM's layer-4 attention output for `text`, and the ids of `stuck`."""
    model, tokenizer = minilm
    snapshot = snapshot_of(model, tokenizer, [text], "attn_output", layer=4)
    ids = tokenizer([stuck], return_tensors="pt")["input_ids"]
    return snapshot, objective_of(model, tokenizer, snapshot), ids


def test_a_slot_optimum_ranks_a_missing_word_first_order_misses(minilm):
    tokenizer = minilm[1]
    # Where a search on CoLA stopped, after the shift that makes room for "the".
    _, objective, ids = minilm_attn_output4(
        minilm, "the mechanical doll wriggled itself loose.",
        "full mechanical doll wriggled itself loose.",
    )  # fmt: skip
    candidates = candidate_token_ids(tokenizer)
    the = int((candidates == tokenizer.convert_tokens_to_ids("the")).nonzero()[0, 0])
    slope = score_gradient(objective, ids.unsqueeze(0), 1)[0][0, 1]
    first_order = objective.embed(candidates) @ slope
    assert int((first_order < first_order[the]).sum()) > 512  # beyond the widest linearised
    settings = settings_of(steps=300)
    optimum = slot_optima(objective, ids.unsqueeze(0), *torch.tensor([[0], [1]]), settings)
    vocab = F.normalize(objective.embed(candidates), dim=-1)
    assert nearest(optimum, vocab, candidates, 1)[0, 0] == candidates[the]


def three_layer_model(vocab_size: int):
    """The tiny model with a third layer (so that layer 1 is not the last) and query and key
    weights 5x the init's, for attention less uniform than at init.

    At the init alone, seed 0's query@1 gradient on the two test sentences has a gap of 115
    after its first singular value and one of 103 where its 14 directions meet rounding:
    which one is larger is up to the machine's float32 rounding (rank 1 on an AMD EPYC; these
    tests passed in earlier CI runs, so 14 there). Here the second gap is about 2300, the
    first about 100.
    """
    model = make_tiny_model(vocab_size, layers=3)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(5)
            layer.attention.self.key.weight.mul_(5)
    return model


def test_a_wrong_sentence_is_searched_again_with_the_others_held(tiny_tokenizer):
    texts = ["the charming cast and the music", "a very boring plot"]
    deeper = three_layer_model(tiny_tokenizer.vocab_size)
    snapshot = snapshot_of(deeper, tiny_tokenizer, texts, "query")
    objective = objective_of(deeper, tiny_tokenizer, snapshot)
    truth = snapshot.batch["input_ids"]
    wrong = truth.clone()
    wrong[1, 1:5] = torch.tensor([40, 41, 42, 43])  # sentence 1 garbled, sentence 0 right
    outside = objective.sentence_outside(wrong)
    assert float(outside[0]) < SENTENCE_FITS < float(outside[1])
    current = objective.score_ids(wrong.unsqueeze(0), 1)[0]
    settings = settings_of(steps=60, restarts=2, sweeps=6, moves=64, linearised=8)
    ids, score, replaced = search_sentences_again(
        objective, wrong, current, candidate_token_ids(tiny_tokenizer), settings, seed=0
    )
    assert replaced == [1] and torch.equal(ids, truth)
    whole = float(objective.score_ids(truth.unsqueeze(0), 1)[0])
    assert float(score) == pytest.approx(whole, rel=1e-6)  # the view scores the whole batch


def test_at_b2_wrong_sentences_are_searched_again_before_the_next_search(
    tiny_tokenizer, monkeypatch
):
    texts = ["the charming cast and the music", "a very boring plot"]
    deeper = three_layer_model(tiny_tokenizer.vocab_size)
    snapshot = snapshot_of(deeper, tiny_tokenizer, texts, "query")
    objective = objective_of(deeper, tiny_tokenizer, snapshot)
    calls = []

    def recorded(name):
        real = getattr(span_search, name)

        def record(objective, ids, *args):
            if len(ids) == 2:  # the batch's own search, not a one-sentence view's
                calls.append(name)
            return real(objective, ids, *args)

        return record

    for name in ("coordinate_descent", "search_sentences_again"):
        monkeypatch.setattr(span_search, name, recorded(name))
    # No continuous steps and one sweep: neither joint search can solve the batch.
    _, info = deep_search(objective, candidate_token_ids(tiny_tokenizer), settings_of(steps=0), 0)
    assert calls[:2] == ["coordinate_descent", "search_sentences_again"]
    assert calls.count("coordinate_descent") == info["searches"] == len(calls) // 2
    assert info["residual"] <= min(info["start_residuals"])


def minilm_query2_of_four(minilm, second):
    """Snapshot and objective of MiniLM's layer-2 query on a batch of four, `second` second."""
    model, tokenizer = minilm
    texts = ["a charming and often affecting journey .", second,
             "the plot is thin but the cast is great", "an ambitious , moving film"]  # fmt: skip
    snapshot = snapshot_of(model, tokenizer, texts, "query", layer=2)
    return snapshot, objective_of(model, tokenizer, snapshot)


def test_two_sentences_stuck_in_each_others_slots_are_both_found_again(minilm):
    snapshot, objective = minilm_query2_of_four(minilm, "bleak and desperate")
    truth = snapshot.batch["input_ids"]
    wrong = truth.clone()
    wrong[0, 1:8] = truth[1, [1, 2, 3, 1, 2, 3, 3]]  # "bleak and desperate bleak and ..."
    wrong[1, 1:4] = truth[0, [2, 5, 6]]  # "charming affecting journey"
    outside = objective.sentence_outside(wrong)
    assert float(outside[2:].max()) < SENTENCE_FITS < float(outside[:2].min())
    current = objective.score_ids(wrong.unsqueeze(0), 1)[0]
    settings = settings_of(steps=100, restarts=2, sweeps=6, moves=64, linearised=16, screen=16)
    ids, score, replaced = search_sentences_again(
        objective, wrong, current, candidate_token_ids(minilm[1]), settings, seed=0
    )
    assert torch.equal(ids, truth) and float(score) < SOLVED and set(replaced) == {0, 1}


def test_a_view_is_finished_once_its_sentence_fits_though_left_out_ones_keep_its_score_up(
    tiny_tokenizer,
):
    texts = ["the charming cast and the music", "a very boring plot"]
    deeper = three_layer_model(tiny_tokenizer.vocab_size)
    snapshot = snapshot_of(deeper, tiny_tokenizer, texts, "query")
    objective = objective_of(deeper, tiny_tokenizer, snapshot)
    truth = snapshot.batch["input_ids"]
    view = objective.holding(truth, 0, held=[])  # sentence 1 left out
    score = view.score_ids(truth[:1].unsqueeze(0), 1)[0]
    assert float(score) > SOLVED and view.finished(truth[:1], score)
    garbled = truth[:1].clone()
    garbled[0, 2] = truth[1, 3]
    assert not view.finished(garbled, view.score_ids(garbled.unsqueeze(0), 1)[0])
    assert not objective.finished(truth, score)  # the whole batch needs a score of ~0


def test_at_b4_the_collapsed_cls_rows_leave_outside_to_the_content_rows(minilm):
    snapshot, objective = minilm_query2_of_four(minilm, "unflinchingly bleak and desperate")
    (module,) = objective.bases
    rows = int(objective.real.sum())
    # Past layer 0 every sentence's [CLS] input looks alike: fewer directions than rows.
    assert int(objective.content.sum()) <= len(objective.bases[module]) < rows
    assert objective.outside[module] == "content"
    truth = snapshot.batch["input_ids"]
    assert float(objective.score_ids(truth.unsqueeze(0), 1)[0]) < SOLVED
    assert float(objective.sentence_outside(truth).max()) < SENTENCE_FITS
    wrong = truth.clone()
    wrong[0, 2], wrong[2, 2] = truth[2, 2], truth[0, 2]  # "charming" and "plot" swapped
    outside = objective.sentence_outside(wrong)
    assert float(outside[[1, 3]].max()) < SENTENCE_FITS < float(outside[[0, 2]].min())


def test_at_b4_a_sweep_searches_only_the_sentences_that_stray_outside_the_span(minilm, monkeypatch):
    snapshot, objective = minilm_query2_of_four(minilm, "unflinchingly bleak and desperate")
    truth = snapshot.batch["input_ids"]
    assert open_sentences(objective, truth) == [True] * 4  # all fit: none left out
    wrong = truth.clone()
    wrong[2, 2] = truth[0, 2]  # "charming" for "plot"
    assert open_sentences(objective, wrong) == [False, False, True, False]
    touched = set()

    def recorded(objective, trial, per_pass, ids, current):
        touched.update((trial != ids).any(-1).any(0).nonzero().flatten().tolist())
        return take_best(objective, trial, per_pass, ids, current)

    take_best = span_descent.take_best
    monkeypatch.setattr(span_descent, "take_best", recorded)
    candidates = candidate_token_ids(minilm[1])
    # Each slot offered its current token only: replacements change nothing, then
    # reorderings (across sentences too) and insertions are tried.
    no_replacements = settings_of(steps=0, neighbours=1, bag=0, linearised=0, moves=64)
    discrete_from(objective, wrong, objective.embed(wrong), candidates, no_replacements)
    assert touched == {2}
    touched.clear()
    replacements = settings_of(steps=0, neighbours=2, bag=0, linearised=2, screen=0)
    found, score, _ = discrete_from(
        objective, wrong, objective.embed(truth), candidates, replacements
    )
    assert touched == {2} and torch.equal(found, truth) and float(score) < SOLVED


def settings_of(**changes):
    base = dict(
        steps=1, restarts=3, lr=0.05, neighbours=8, bag=2, linearised=4, screen=8, inserts=2,
        sweeps=1, moves=16, forward_batch=8,
    )  # fmt: skip
    return DeepSettings(**{**base, **changes})


def test_continuous_restarts_step_at_geometrically_spread_rates(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    settings = settings_of()
    x, _ = optimise_embeddings(objective, settings, torch.Generator().manual_seed(0))
    emb = objective.embeddings
    start = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=emb.dtype)
    origin = start * emb.std(0) + emb.mean(0)
    # Adam's first step moves every coordinate by its rate: geometric from lr to LR_SPREAD*lr.
    steps = (x - origin).abs().flatten(1).median(1).values
    rates = settings.lr * float(emb.std(0).mean()) * LR_SPREAD ** torch.tensor([0, 0.5, 1])
    assert torch.allclose(steps, rates.to(steps), rtol=1e-3)


def test_an_unsolved_search_goes_on_from_a_kick_of_its_result(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    candidates = candidate_token_ids(tiny_tokenizer)
    # Random starts and one narrow sweep (a kick and one sweep of the default width solve it).
    narrow = settings_of(steps=0, neighbours=2, bag=0, linearised=1, screen=2, inserts=0, moves=0)
    ids, info = deep_search(objective, candidates, narrow, seed=0)
    assert info["residual"] > SOLVED
    assert info["searches"] == len(SEARCHES)
    assert SEARCHES.count("start") < len(info["start_residuals"])  # not every fresh start
    assert len(info["kicked_start_residuals"]) == SEARCHES.count("kick")
    assert info["residual"] <= min(info["start_residuals"])
    assert info["residual"] == pytest.approx(float(objective.score_ids(ids.unsqueeze(0), 1)[0]))


def test_kicked_restarts_are_drawn_around_the_stuck_tokens(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    ids = snapshot.batch["input_ids"]
    generator = torch.Generator().manual_seed(0)
    x, _ = optimise_embeddings(objective, settings_of(steps=0), generator, around=ids)
    spread = (x - objective.embed(ids)) / objective.embeddings.std(0)
    assert float(spread.mean()) == pytest.approx(0, abs=0.05)
    assert float(spread.std()) == pytest.approx(KICK, rel=0.1)


def test_a_kick_frees_a_search_stuck_several_tokens_from_the_truth(minilm):
    # Where the search from the best start stopped: the fix changes three tokens and shifts
    # the rest by one.
    snapshot, objective, stuck = minilm_attn_output4(
        minilm, "it's a charming and often affecting journey.",
        "its a a charming and often affecting journey just.",
    )  # fmt: skip
    candidates = candidate_token_ids(minilm[1])
    raw = objective.embed(candidates)
    vocab = F.normalize(raw, dim=-1)
    settings = settings_of(
        steps=300, restarts=4, neighbours=64, bag=8, linearised=32, screen=32, inserts=16,
        moves=1024, forward_batch=32,
    )  # the defaults, one sweep  # fmt: skip
    score = objective.score_ids(stuck.unsqueeze(0), 1)[0]
    same, _, _ = coordinate_descent(
        objective, stuck, score, objective.embed(stuck), vocab, raw, candidates, settings, 32,
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(same, stuck)  # no replacement, reordering or insertion helps
    generator = torch.Generator().manual_seed(0)
    start, start_score, source = kicked_start(
        objective, stuck, vocab, candidates, settings, 32, generator
    )
    ids, solved, _ = coordinate_descent(
        objective, start, start_score, source, vocab, raw, candidates, settings, 32, generator
    )
    assert torch.equal(ids, snapshot.batch["input_ids"]) and float(solved) < SOLVED


def test_replacements_are_put_off_while_reorderings_still_help(model, tiny_tokenizer, monkeypatch):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    truth = snapshot.batch["input_ids"]
    wrong = truth.clone()
    wrong[0, [2, 3, 4, 6]] = truth[0, [3, 2, 6, 4]]  # the cast charming music the and
    candidates = candidate_token_ids(tiny_tokenizer)
    settings = settings_of(
        steps=0, neighbours=1, bag=0, linearised=0, screen=0, inserts=0, sweeps=5,
        moves=len(reorderings(objective.content)),
    )  # fmt: skip
    kinds = []  # each scored set: r(eplacements at one slot) or m(oves); + where one helped

    def counted(objective, trial, per_pass, ids, current):
        found = take_best(objective, trial, per_pass, ids, current)
        if not len(trial):  # no insertions
            return found
        changed = int((trial != ids).sum((1, 2)).max())
        kinds.append(("r" if changed <= 1 else "m") + ("+" if found[1] < current else "."))
        return found

    take_best = span_descent.take_best
    monkeypatch.setattr(span_descent, "take_best", counted)
    found, score, sweeps = discrete_from(
        objective, wrong, objective.embed(wrong), candidates, settings
    )
    assert torch.equal(found, truth) and float(score) < SOLVED and sweeps == 2
    # The first sweep's replacements (each slot's own token) change nothing and a reordering
    # helps, so the second sweep reorders without them.
    assert kinds == ["r."] * 6 + ["m+", "m+"]


def test_a_search_out_of_time_returns_its_best_batch_and_says_so(model, tiny_tokenizer):
    snapshot = snapshot_of(model, tiny_tokenizer, ["the movie was good", "a dark story"], "key")
    cut = get_attack("span", deep_seconds=1e-9).reconstruct(
        model, snapshot, tokenizer=tiny_tokenizer, device="cpu", seed=0, budget=1.0
    )
    assert cut.info["mode"] == "deep" and "limit" in cut.info["out_of_time"]
    assert cut.info["searches"] == 0 and cut.info["sweeps"] == 0  # every stage stopped
    assert [len(ids) for ids in cut.token_ids] == [len(ids) for ids in truth_of(snapshot)]
    within = get_attack("span").reconstruct(  # the default limit: 600 s x budget
        model, snapshot, tokenizer=tiny_tokenizer, device="cpu", seed=0, budget=0.3
    )
    assert "out_of_time" not in within.info and within.token_ids == truth_of(snapshot)


def test_a_negative_time_limit_is_an_error():
    with pytest.raises(GradAuditError, match="deep_seconds must be at least 0"):
        get_attack("span", deep_seconds=-1)


@pytest.mark.parametrize("noisy", [True, False])
def test_on_a_dropout_gradient_a_kick_that_rounds_back_onto_the_result_ends_the_search(
    model, tiny_tokenizer, monkeypatch, noisy
):
    snapshot = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    objective = objective_of(model, tiny_tokenizer, snapshot)
    kicked = []

    def rounds_back(objective, ids, *args):  # every kicked restart rounds onto `ids`
        kicked.append(ids)
        return ids, objective.score_ids(ids.unsqueeze(0), 1)[0], objective.embed(ids)

    monkeypatch.setattr(span_search, "kicked_start", rounds_back)
    narrow = settings_of(steps=0, neighbours=2, bag=0, linearised=1, screen=2, inserts=0, moves=0)
    narrow.noisy = noisy
    _, info = deep_search(objective, candidate_token_ids(tiny_tokenizer), narrow, seed=0)
    assert info["residual"] > SOLVED and len(kicked) == 1  # unsolved, so it was kicked
    if noisy:
        assert info["kick_agreed"] and info["searches"] == 1
    else:  # eval mode: the truth scores 0, so an unsolved search goes on
        assert "kick_agreed" not in info and info["searches"] == len(SEARCHES)


def test_span_on_a_train_mode_gradient_searches_as_a_noisy_one(model, tiny_tokenizer):
    batch = make_batch(model, tiny_tokenizer, [TEXT], [1])
    module = layout(model).component_name("key", 1)
    noisy = capture(model, batch, [module], train_mode=True, seed=0)
    result = get_attack("span", deep_steps=20, deep_sweeps=2).reconstruct(
        model, noisy, tokenizer=tiny_tokenizer, device="cpu", seed=0, budget=1.0
    )
    assert result.info["mode"] == "deep" and "kick_agreed" in result.info
    clean = snapshot_of(model, tiny_tokenizer, [TEXT], "key")
    result = get_attack("span", deep_steps=20, deep_sweeps=2).reconstruct(
        model, clean, tokenizer=tiny_tokenizer, device="cpu", seed=0, budget=1.0
    )
    assert "kick_agreed" not in result.info
