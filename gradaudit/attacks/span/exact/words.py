"""Which words a layer-0 batch holds, and where the ones it holds once sit.

Before LayerNorm a layer-0 input is a word part plus a slot part, so the weight gradient
splits exactly over the word parts, the slot parts and beta:
`G = sum_v a_v e_v^T + sum_j b_j p_j^T + c beta^T`. One least-squares solve gives each word's
share `a_v` and each slot's share `b_j`, however many false (word, slot) pairs the row space
admits: a word met once has its whole share at one slot, which places it; the others are
ranked for the slots left open. The search never replaces a placed word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradaudit.attacks.span.exact.screening import Slot, norm_affine, pick_by_gap
from gradaudit.model.families import ModelLayout

DECOMPOSED = 1e-4  # relative residual of G against the word/slot/beta basis: an exact split
INDEPENDENT = 1e-9  # smallest singular value of that basis, relative: it must be independent
WHOLE = (0.85, 1.15)  # a regression coefficient that means "this word's whole part is here"
ELSEWHERE = 0.35  # largest coefficient the same word may have at any other slot
SPARE = 4  # words beyond a place's open tokens that its pool offers


@dataclass
class WordPlaces:
    """The batch's words, where the regression placed some, and pools for the rest."""

    words: torch.Tensor  # ids of every word that occurs (content words, then specials)
    placed: list[list[int]]  # per content slot: ids of the words placed there, one token each
    leftover: list[int]  # ids of the words not placed (mostly words met more than once)
    ranked: list[list[int]]  # per content slot with tokens open: leftover ids, likeliest first

    def pools(self, device: torch.device) -> list[torch.Tensor]:
        """Per content slot: its placed words, then the leftover words ranked."""
        return [
            torch.tensor(p + r, dtype=torch.long, device=device)
            for p, r in zip(self.placed, self.ranked)
        ]


def _centred(gamma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return gamma * (rows - rows.mean(-1, keepdim=True))


def occurring_words(
    lay: ModelLayout,
    basis: torch.Tensor,
    slot_parts: torch.Tensor,
    beta: torch.Tensor,
    candidates: torch.Tensor,
    *,
    most: int,
    chunk: int,
) -> torch.Tensor:
    """Ids among `candidates` whose word part lies in span(`basis`, `slot_parts`, `beta`).

    At most `most` (the content tokens); the cut is the largest jump in the sorted residuals.
    """
    gamma, _ = norm_affine(lay, basis.device)
    # The pieces overlap (the row space holds words + slot parts): an SVD keeps only what
    # they span, where a QR would add arbitrary directions for the dependent ones.
    pieces = torch.cat([basis, slot_parts, beta[None]])
    _, values, rows = torch.linalg.svd(pieces, full_matrices=False)
    span = rows[values > values[0] * INDEPENDENT]
    table = lay.word_embeddings.weight.detach()
    res = []
    for start in range(0, len(candidates), chunk):
        e = _centred(gamma, table[candidates[start : start + chunk].to(basis.device)].to(basis))
        res.append(1 - (e @ span.T).square().sum(-1) / e.square().sum(-1))
    order = torch.cat(res).clamp_min(0).sort()
    count = pick_by_gap(order.values.sqrt(), most)
    return candidates.to(basis.device)[order.indices[:count]]


def word_places(
    lay: ModelLayout,
    target: torch.Tensor,
    basis: torch.Tensor,
    slots: list[Slot],
    special_ids: torch.Tensor,
    special_offsets: torch.Tensor,
    offsets: torch.Tensor,
    candidates: torch.Tensor,
    *,
    chunk: int,
) -> WordPlaces | None:
    """Split `target` over word and slot parts and place the words that occur once.

    `offsets` are the content slots' position + segment embeddings; `special_ids` and
    `special_offsets` the known special tokens and theirs. None when the split is not exact
    (noised gradient, dependent basis: e.g. two segments at two positions each).
    """
    device = basis.device
    gamma, beta = norm_affine(lay, device)
    # Every place that holds a token (content or special): identical offsets are one place.
    all_offsets = torch.cat([offsets, special_offsets])
    places, slot_place = torch.unique(all_offsets, dim=0, return_inverse=True)
    place_parts = _centred(gamma, places)
    content_tokens = sum(len(s.sentences) for s in slots)
    words = occurring_words(
        lay, basis, place_parts, beta, candidates, most=content_tokens, chunk=chunk
    )
    specials = torch.unique(special_ids.to(device))
    vocab = torch.cat([words, specials])
    table = lay.word_embeddings.weight.detach()
    word_parts = _centred(gamma, table[vocab].to(torch.float64))
    shares = split_shares(target, word_parts, place_parts, beta)
    if shares is None:
        return None
    a, b = shares
    need = torch.zeros(len(places), dtype=torch.long, device=device)
    slot_of = slot_place[: len(slots)]
    for j, slot in enumerate(slots):
        need[slot_of[j]] += len(slot.sentences)
    crowd = max(len(s.sentences) for s in slots)  # most tokens one slot holds
    placed, free = place_whole_words(a, b, need, len(words), crowd)
    share = leftover_shares(a, b, need, free, crowd)
    ranked = []
    for j in range(len(slots)):
        t = int(slot_of[j])
        order = share[t].argsort(descending=True)[: int(need[t]) + SPARE] if need[t] else []
        ranked.append([int(words[free[i]]) for i in order])
    return WordPlaces(
        words=vocab,
        placed=[[int(words[v]) for v in placed[int(slot_of[j])]] for j in range(len(slots))],
        leftover=[int(words[v]) for v in free],
        ranked=ranked,
    )


def split_shares(
    target: torch.Tensor, word_parts: torch.Tensor, place_parts: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each word's share `a` (out x words) and each place's share `b` (out x places) of
    `target`, from one least-squares fit on the word, place and beta parts; None when those
    parts are dependent or do not explain `target` exactly."""
    # beta's term drops out where beta is zero (an untrained LayerNorm): leave it out then.
    split = torch.cat([word_parts, place_parts, beta[None][: int(bool(beta.any()))]])
    values = torch.linalg.svdvals(split)
    if values[-1] < values[0] * INDEPENDENT:
        return None
    fit = torch.linalg.lstsq(split.T, target.double().T).solution.T  # out x K
    if (target - fit @ split).norm() > DECOMPOSED * target.norm():
        return None
    count = len(word_parts)
    a = fit[:, :count]
    b = fit[:, count : count + len(place_parts)].clone()
    return a, b


def place_whole_words(
    a: torch.Tensor, b: torch.Tensor, need: torch.Tensor, words: int, crowd: int
) -> tuple[list[list[int]], list[int]]:
    """Per place, the content words (indices below `words` into `a`'s columns) whose whole
    share `b` holds there, and the words left unplaced.

    Regressing each place's share on the words' puts a coefficient of about 1 on a word met
    once at its place and about 0 elsewhere; the surest are placed while their places have
    tokens open (`need`), taken off `b` and `need` (in place), and the regression runs again.
    `crowd` is the most tokens one slot holds.
    """
    placed: list[list[int]] = [[] for _ in range(b.shape[1])]
    free = list(range(words))  # content words not placed yet
    while free:
        active = free + list(range(words, a.shape[1]))
        coef = torch.linalg.lstsq(a[:, active], b).solution[: len(free)]  # free words x places
        # In a key gradient each sentence's signals sum to zero, so the parts nearly do too and
        # the fit is loose along "every word alike". While most words cannot be at a given
        # slot, its median coefficient is that offset.
        if len(free) > 2 * crowd:
            coef = coef - coef.median(0, keepdim=True).values
        coef[:, need == 0] = 0
        best, where = coef.max(1)
        others = coef.abs().scatter(1, where[:, None], 0).amax(1)
        whole = (best > WHOLE[0]) & (best < WHOLE[1]) & (others < ELSEWHERE)
        taken = []
        for i in (best - 1).abs().argsort().tolist():  # the surest first, while places have room
            t = int(where[i])
            if whole[i] and need[t] > 0:
                need[t] -= 1
                placed[t].append(free[i])
                b[:, t] -= a[:, free[i]]
                taken.append(i)
        if not taken:
            break
        free = [v for k, v in enumerate(free) if k not in taken]
    return placed, free


def leftover_shares(
    a: torch.Tensor, b: torch.Tensor, need: torch.Tensor, free: list[int], crowd: int
) -> torch.Tensor:
    """How likely each unplaced word in `free` sits at each place (places x free): its share
    regressed on what the open places' shares have left (a place holding only that word gets
    coefficient 1)."""
    open_places = (need > 0).nonzero().flatten()
    share = torch.zeros(len(need), len(free), dtype=a.dtype, device=a.device)
    if len(open_places) and free:
        fit = torch.linalg.lstsq(b[:, open_places], a[:, free]).solution
        if len(open_places) > 2 * crowd:  # the same offset as in `place_whole_words`
            fit = fit - fit.median(0, keepdim=True).values
        share[open_places] = fit
    return share
