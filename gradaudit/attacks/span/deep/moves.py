"""Deep mode's discrete moves: candidate batches near the current tokens, ranked to first order.

Every move (a replacement, a reordering, an insertion that shifts a sentence) is ranked before
any is scored, from one backward pass at the current tokens: replacing u by v changes the
score by about `(e_v - e_u) . grad`. First order ranks well at some modules and barely better
than chance at others, so half of the moves tried are the best ranked and half are random.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from gradaudit.attacks.span.deep.continuous import nearest, slot_optima
from gradaudit.attacks.span.deep.objective import DeepSettings, SpanObjective

BLOCK = 3  # longest run of tokens that an exchange moves as one


def score_gradient(objective: SpanObjective, ids: torch.Tensor, per_pass: int) -> torch.Tensor:
    """Gradient (K, B, L, H) of each candidate's score with respect to its embeddings."""
    grads = []
    for part in ids.split(per_pass):
        x = objective.embed(part).requires_grad_(True)
        grads.append(torch.autograd.grad(objective(x).sum(), [x])[0])
    return torch.cat(grads)


def first_order_best(
    grad: torch.Tensor, vocab: torch.Tensor, candidates: torch.Tensor, k: int
) -> torch.Tensor:
    """Ids (n, k) of the tokens whose embedding most lowers the score at each of n slots with
    score gradients `grad` (n, H), to first order: replacing u by v changes it by about
    (e_v - e_u) . grad, so these reach words wherever they lie in embedding space."""
    return candidates[(grad @ vocab.T).topk(min(k, len(candidates)), largest=False).indices]


def first_order_gain(
    objective: SpanObjective, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score's gradient (N, H) at the N flat slots of `ids` (one backward) and `gain`
    (N, N): putting the token of slot q at slot p changes the score by about
    gain[p, q] - gain[p, p], so every reordering can be ranked before any is scored."""
    slope = score_gradient(objective, ids.unsqueeze(0), 1)[0].flatten(0, 1)
    return slope, slope @ objective.embed(ids.flatten()).T


def first_order_change(gain: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """First-order score change (M,) of each index permutation (M, N) of the flat slots."""
    return gain.gather(1, perms.T).sum(0) - gain.diagonal().sum()


def promising(change: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `k` candidates: the half that lowers the score most to first order
    (`change`), the rest drawn at random. First order ranks a reordering well at some modules
    (query) and barely better than chance at others (attention output, FFN output), so the
    random half keeps every move reachable."""
    if k >= len(change):
        return torch.arange(len(change), device=change.device)
    order = change.argsort()
    rest = order[k // 2 :]
    drawn = torch.randperm(len(rest), generator=generator)[: k - k // 2].to(rest.device)
    return torch.cat([order[: k // 2], rest[drawn]])


def reorderings(mask: torch.Tensor) -> torch.Tensor:
    """Index permutations (M, B * L) of the flattened batch: every swap of two content tokens
    (across sentences too), every move of one content token to another slot of its sentence
    (the others shift), and every exchange of two runs of up to `BLOCK` tokens of a sentence
    of which one is longer than a token (a phrase put in the wrong place)."""
    mask = mask.cpu()
    identity = torch.arange(mask.numel())
    perms = []
    for i, j in torch.combinations(mask.flatten().nonzero().flatten(), 2).tolist():
        perm = identity.clone()
        perm[i], perm[j] = j, i
        perms.append(perm)
    for b, row in enumerate(mask):
        slots = row.nonzero().flatten() + b * mask.shape[1]
        for i, j in torch.combinations(torch.arange(len(slots)), 2).tolist():
            if j - i < 2:
                continue  # a move by one slot is a swap
            segment = slots[i : j + 1]
            for shifted in (segment.roll(1), segment.roll(-1)):
                perm = identity.clone()
                perm[segment] = shifted
                perms.append(perm)
        n = len(slots)
        for i in range(n):
            for first in range(1, BLOCK + 1):
                for j in range(i + first, n):
                    for second in range(1, min(BLOCK, n - j) + 1):
                        if first == second == 1:
                            continue  # a swap
                        order = torch.arange(n)
                        order = torch.cat(
                            [
                                order[:i],
                                order[j : j + second],
                                order[i + first : j],
                                order[i : i + first],
                                order[j + second :],
                            ]
                        )
                        perm = identity.clone()
                        perm[slots] = slots[order]
                        perms.append(perm)
    return torch.stack(perms) if perms else identity.unsqueeze(0)[:0]


def insertion_shifts(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index permutations (M, B * L) of the flattened batch that take one content token out
    and put it back elsewhere in its sentence (the tokens between shift by one), with the
    flat slot (M,) where it lands: that slot is opened for an insertion."""
    mask = mask.cpu()
    identity = torch.arange(mask.numel())
    perms, opened = [], []
    for b, row in enumerate(mask):
        slots = row.nonzero().flatten() + b * mask.shape[1]
        for i, j in itertools.permutations(range(len(slots)), 2):
            order = list(range(len(slots)))
            order.insert(j, order.pop(i))
            perm = identity.clone()
            perm[slots] = slots[order]
            perms.append(perm)
            opened.append(int(slots[j]))
    if not perms:
        return identity.unsqueeze(0)[:0], identity[:0]
    return torch.stack(perms), torch.tensor(opened)


def within(
    shifts: tuple[torch.Tensor, torch.Tensor], searched: list[bool], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `shifts` (see `insertion_shifts`) whose sentence is `searched`."""
    perms, opened = shifts
    keep = torch.tensor(searched)[opened // length]
    return perms[keep], opened[keep]


def shifted_insertions(
    objective: SpanObjective,
    ids: torch.Tensor,
    shifts: tuple[torch.Tensor, torch.Tensor],
    vocab: torch.Tensor,
    candidates: torch.Tensor,
    settings: DeepSettings,
    generator: torch.Generator,
    refine: bool = False,
) -> torch.Tensor:
    """Candidates (M, B, L): one content token deleted and a new one inserted elsewhere in its
    sentence, the tokens between shifting by one. Fixes a missing word plus a doubled one, which
    no single replacement or reordering improves. `moves / inserts` shifts are tried
    (`promising`: first order counts the shift plus the best token at the opened slot), each
    with the `inserts` best tokens to first order at its opened slot (a batched backward over
    the shifted sequences), and with `refine` also the `inserts` nearest to the slot's own
    optimum (`slot_optima`).
    """
    perms, opened = (t.to(ids.device) for t in shifts)
    if not len(perms) or not settings.inserts:
        return ids.unsqueeze(0)[:0]
    slope, gain = first_order_gain(objective, ids)
    best_token = (slope @ vocab.T).min(1).values  # (N,): the best insert at each slot
    moved = perms.gather(1, opened.unsqueeze(1)).squeeze(1)
    change = first_order_change(gain, perms) + best_token[opened] - gain[opened, moved]
    chosen = promising(change, max(1, settings.moves // settings.inserts), generator)
    trials = ids.flatten()[perms[chosen]].view(-1, *ids.shape)
    rows, columns = opened[chosen] // ids.shape[1], opened[chosen] % ids.shape[1]
    grad = score_gradient(objective, trials, max(1, settings.forward_batch // ids.shape[0]))
    inserts = first_order_best(
        grad[torch.arange(len(trials)), rows, columns], vocab, candidates, settings.inserts
    )
    if refine:
        optima = slot_optima(objective, trials, rows, columns, settings)
        near = nearest(optima, F.normalize(vocab, dim=-1), candidates, settings.inserts)
        inserts = torch.cat([inserts, near], 1)
    per = inserts.shape[1]
    out = trials.repeat_interleave(per, 0)
    out[torch.arange(len(out)), rows.repeat_interleave(per), columns.repeat_interleave(per)] = (
        inserts.flatten()
    )
    return out
