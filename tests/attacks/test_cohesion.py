"""Sorting rows into sentences by their signals' shared direction (value modules)."""

from __future__ import annotations

import torch

from gradaudit.attacks.span.exact.cohesion import cohere
from gradaudit.attacks.span.exact.screening import Slot

SENTENCES, COLUMNS = 3, 5


def batch_of_rows(generator: torch.Generator):
    """Rows whose signals are their sentence's direction plus noise: column 0 is each
    sentence's own group (a [SEP] at its own length), columns 1.. are shared by all three,
    their rows given to the sentences in shuffled order."""
    directions = torch.randn(SENTENCES, 64, generator=generator)
    truth = torch.arange(SENTENCES * COLUMNS).reshape(COLUMNS, SENTENCES).T  # row per (b, col)
    owner = torch.arange(SENTENCES * COLUMNS) % SENTENCES  # row r is sentence r % 3's
    signals = directions[owner] + 0.5 * torch.randn(len(owner), 64, generator=generator)
    slots = [Slot(0, 0, 0, (b,)) for b in range(SENTENCES)]
    pools = [truth[b, :1] for b in range(SENTENCES)]
    for column in range(1, COLUMNS):
        slots.append(Slot(column, column, 0, tuple(range(SENTENCES))))
        pools.append(truth[:, column])
    start = truth.clone()
    for column in range(1, COLUMNS):
        start[:, column] = truth[torch.randperm(SENTENCES, generator=generator), column]
    return truth, start, slots, pools, signals


def test_shuffled_rows_go_back_to_their_sentences():
    truth, start, slots, pools, signals = batch_of_rows(torch.Generator().manual_seed(0))
    index, margin = cohere(start, slots, pools, signals)
    assert torch.equal(index, truth)
    assert margin > 0


def test_a_missing_row_leaves_one_place_empty_or_shared_in_eval_mode():
    truth, start, slots, pools, signals = batch_of_rows(torch.Generator().manual_seed(1))
    lost = int(truth[2, 3])
    pools[SENTENCES + 2] = pools[SENTENCES + 2][pools[SENTENCES + 2] != lost]
    start[start == lost] = int(truth[0, 3])
    index, _ = cohere(start, slots, pools, signals)
    expected = truth.clone()
    expected[2, 3] = -1
    assert torch.equal(index, expected)
    shared, _ = cohere(start, slots, pools, signals, share=True)
    assert int(shared[2, 3]) in pools[SENTENCES + 2].tolist()
    assert torch.equal(shared[:2], truth[:2])


def test_a_sentence_with_no_row_found_gets_none_and_the_others_theirs():
    truth, start, slots, pools, signals = batch_of_rows(torch.Generator().manual_seed(2))
    lost = truth[2].tolist()
    pools = [p[~torch.isin(p, torch.tensor(lost))] for p in pools]
    start[torch.isin(start, torch.tensor(lost))] = -1
    index, _ = cohere(start, slots, pools, signals)
    assert (index[2] == -1).all()
    assert torch.equal(index[:2], truth[:2])


def test_with_no_shared_slot_holding_two_rows_the_margin_is_none_not_an_error():
    truth, start, slots, pools, signals = batch_of_rows(torch.Generator().manual_seed(3))
    lost = truth[1:, 1:].flatten()  # only sentence 0 keeps rows at the shared columns
    pools = [p[~torch.isin(p, lost)] for p in pools]
    start[torch.isin(start, lost)] = -1
    index, margin = cohere(start, slots, pools, signals)
    assert margin is None
    assert torch.equal(index[0], truth[0]) and (index[1:, 1:] == -1).all()
