"""Which sentence each token belongs to, for value modules: their signals point one way.

A layer-0 value signal is `sum_i A_ij g_i`: the upstream signals `g_i` of the queries of its
own sentence, mixed by how much each attends to token `j`. Where heads attend broadly every
token of a sentence gets about the same mix, so the signals of one sentence share a direction
and another sentence's point elsewhere. Sorting the found rows into sentences is then a
clustering with one row per (sentence, slot), seeded by the rows only one sentence can hold.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from gradaudit.attacks.span.exact.screening import Slot

ROUNDS = 10  # matching rounds at most (the measured batches settled after one)


def cohere(
    index: torch.Tensor, slots: list[Slot], pools: list[torch.Tensor], signals: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Row per (sentence, column) matched to the sentences' mean signal directions.

    `index` (batch x length, -1 where no row) is the start; `slots` and `pools` are the slot
    groups and their found rows (-1 for none: where a group has fewer rows than sentences, the
    sentences matched least well get none); `signals` are the rows' backward signals. Per group
    shared by several sentences the rows go to the sentences by a Hungarian match on cosine to
    each sentence's mean direction (first from the rows of groups only one sentence holds, e.g.
    its [SEP] at its length), the means recomputed, until nothing moves. Returns the index and
    the smallest margin by which a shared row is nearer its own sentence's mean than another's
    (how clear the sort was).
    """
    unit = torch.nn.functional.normalize(signals.double(), dim=1)
    index = index.clone()
    shared = [(s, p) for s, p in zip(slots, pools) if len(s.sentences) > 1]
    fixed = torch.full_like(index, -1)
    for slot, pool in zip(slots, pools):
        if len(slot.sentences) == 1:
            fixed[slot.sentences[0], slot.column] = pool[0]
    held = (fixed >= 0).any(1, keepdim=True)
    means = _means(unit, torch.where(held, fixed, index))
    for _ in range(ROUNDS):
        moved = False
        for slot, pool in shared:
            rows, sentences = [r for r in pool.tolist() if r >= 0], list(slot.sentences)
            before = index[sentences, slot.column].clone()
            index[sentences, slot.column] = -1  # where rows are missing, some sentence gets none
            cost = -(means[sentences] @ unit[rows].T)
            for s, r in zip(*linear_sum_assignment(cost.cpu().numpy())):
                index[sentences[s], slot.column] = rows[r]
            moved |= bool((before != index[sentences, slot.column]).any())
        means = _means(unit, index)
        if not moved:
            break
    return index, _margin(unit, means, index, shared)


def _means(unit: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each sentence's mean unit signal over the rows `index` gives it."""
    return torch.stack([unit[row[row >= 0]].mean(0) for row in index])


def _margin(
    unit: torch.Tensor,
    means: torch.Tensor,
    index: torch.Tensor,
    shared: list[tuple[Slot, torch.Tensor]],
) -> float:
    margin = float("inf")
    for slot, _ in shared:
        sentences = [b for b in slot.sentences if index[b, slot.column] >= 0]
        similarity = means[sentences] @ unit[index[sentences, slot.column]].T
        own = similarity.diagonal()
        other = similarity.masked_fill(torch.eye(len(sentences), dtype=torch.bool), -2).amax(0)
        margin = min(margin, float((own - other).min()))
    return margin
