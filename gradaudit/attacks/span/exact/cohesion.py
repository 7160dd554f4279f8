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

from gradaudit.attacks.span.exact.membership import distinct_inputs
from gradaudit.attacks.span.exact.screening import Slot
from gradaudit.model.families import ModelLayout

ROUNDS = 10  # matching rounds at most (the measured batches settled after one)


def cohere(
    index: torch.Tensor,
    slots: list[Slot],
    pools: list[torch.Tensor],
    signals: torch.Tensor,
    share: bool = False,
) -> tuple[torch.Tensor, float | None]:
    """Row per (sentence, column) matched to the sentences' mean signal directions.

    `index` (batch x length, -1 where no row) is the start; `slots` and `pools` are the slot
    groups and their rows (-1 for none); `signals` are the rows' backward signals. Per group
    shared by several sentences the rows go to the sentences by a Hungarian match on cosine to
    each sentence's mean direction (first from the rows outside those groups, e.g. its [SEP] at
    its length), the means recomputed, until nothing moves. Where a group has fewer rows than
    sentences, the sentences matched least well get none, or with `share` (eval mode, where
    equal inputs are one row) their nearest row. Returns the index and the smallest margin by
    which a row is nearer its own sentence's mean than another's (how clear the sort was;
    None where no slot has rows of two sentences to compare).
    """
    unit = torch.nn.functional.normalize(signals.double(), dim=1).to(index.device)
    index = index.clone()
    shared = [(s, p) for s, p in zip(slots, pools) if len(s.sentences) > 1]
    seeds = index.clone()
    for slot, _ in shared:
        seeds[list(slot.sentences), slot.column] = -1
    held = (seeds >= 0).any(1, keepdim=True)
    means = _means(unit, torch.where(held, seeds, index))
    for _ in range(ROUNDS):
        moved = False
        for slot, pool in shared:
            rows, sentences = [r for r in pool.tolist() if r >= 0], list(slot.sentences)
            before = index[sentences, slot.column].clone()
            similarity = means[sentences] @ unit[rows].T
            index[sentences, slot.column] = -1
            if share and rows:
                nearest = similarity.argmax(1).to(index.device)
                index[sentences, slot.column] = torch.tensor(rows, device=index.device)[nearest]
            for s, r in zip(*linear_sum_assignment(-similarity.cpu().numpy())):
                index[sentences[s], slot.column] = rows[r]
            moved |= bool((before != index[sentences, slot.column]).any())
        means = _means(unit, index)
        if not moved:
            break
    return index, _margin(unit, means, index, shared)


def cohesion_order(
    lay: ModelLayout,
    batch: dict[str, torch.Tensor],
    target: torch.Tensor,
    ids: torch.Tensor,
    slots: list[Slot],
) -> torch.Tensor:
    """Eval mode: the hypothesis `ids` (each content slot's candidate tokens, one per sentence
    holding it) with its tokens sorted into sentences by their signals' cohesion; the signals
    come from `target` = D^T H over the hypothesis' distinct inputs H."""
    mask = batch["attention_mask"].bool()
    inputs, inverse = distinct_inputs(lay, batch, ids)
    signals = torch.linalg.lstsq(inputs.T, target.T.double(), driver="gelsd").solution
    index = torch.full_like(ids, -1)
    index[mask] = inverse
    pools = [index[list(s.sentences), s.column].unique() for s in slots]
    index, _ = cohere(index, slots, pools, signals, share=True)
    tokens = torch.zeros(len(inputs), dtype=ids.dtype, device=ids.device)
    tokens[inverse] = ids[mask]
    out = ids.clone()
    out[mask] = tokens[index[mask]]
    return out


def _means(unit: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each sentence's mean unit signal over the rows `index` gives it alone (a row several
    sentences hold, e.g. eval mode's one [CLS] input, carries their signals' sum); 0 for a
    sentence none of whose rows was found (it matches nothing better than anything)."""
    counts = torch.bincount(index[index >= 0], minlength=len(unit))
    means = []
    for row in index:
        rows = row[row >= 0]
        own = rows[counts[rows] == 1]
        pick = own if len(own) else rows
        means.append(unit[pick].mean(0) if len(pick) else unit.new_zeros(unit.shape[1]))
    return torch.stack(means)


def _margin(
    unit: torch.Tensor,
    means: torch.Tensor,
    index: torch.Tensor,
    shared: list[tuple[Slot, torch.Tensor]],
) -> float | None:
    margin = None
    for slot, _ in shared:
        sentences = [b for b in slot.sentences if index[b, slot.column] >= 0]
        if len(sentences) < 2:  # rows missing: nothing to compare here
            continue
        similarity = means[sentences] @ unit[index[sentences, slot.column]].T
        own = similarity.diagonal()
        eye = torch.eye(len(sentences), dtype=torch.bool, device=similarity.device)
        other = similarity.masked_fill(eye, -2).amax(0)
        gap = float((own - other).min())
        margin = gap if margin is None else min(margin, gap)
    return margin
