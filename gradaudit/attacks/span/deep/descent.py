"""Deep mode's coordinate descent over tokens: sweeps of replacements, reorderings, insertions.

Each sweep, every open position tries its candidate tokens, then the best-ranked and some random
reorderings, then insertions that shift a sentence; a move is taken when it lowers the score.
Candidates changing one sentence run that sentence alone (the others' module inputs are
reused), and a rough objective, where there is one, ranks them before the best few are scored
at full precision.
"""

from __future__ import annotations

import torch

from gradaudit.attacks.span.deep.continuous import REFINE_SHARE, nearest, slot_optima
from gradaudit.attacks.span.deep.moves import (
    first_order_best,
    first_order_change,
    first_order_gain,
    insertion_shifts,
    promising,
    reorderings,
    score_gradient,
    shifted_insertions,
    within,
)
from gradaudit.attacks.span.deep.objective import SENTENCE_FITS, DeepSettings, SpanObjective

WIDEN = 4  # a sweep that changes nothing is retried with this many times more linearised tokens
WIDEST = 16  # ... up to this many times `linearised`; still stuck, one sweep refines
ROUGH_KEEP = 8  # of the candidates a rough objective ranks, scored again at full precision
ROUGH_NOISE = 3.0  # ... and those this many times its error on the current ids from its best


class Sweeps:
    """The moves a coordinate descent from one start tries: each position's pool of nearest
    tokens (of the start's continuous source `x`), the batch's reorderings and shifts."""

    def __init__(
        self,
        objective: SpanObjective,
        x: torch.Tensor,
        vocab: torch.Tensor,
        raw_vocab: torch.Tensor,
        candidates: torch.Tensor,
        settings: DeepSettings,
        per_pass: int,
        generator: torch.Generator,
    ) -> None:
        self.objective, self.settings, self.per_pass = objective, settings, per_pass
        self.vocab, self.raw_vocab, self.candidates = vocab, raw_vocab, candidates
        self.generator = generator
        mask = objective.content
        top = nearest(x[mask], vocab, candidates, max(settings.neighbours, settings.bag))
        bag = top[:, : settings.bag].flatten().unique()
        self.positions = mask.nonzero().tolist()
        self.pools = [
            torch.cat([top[i, : settings.neighbours], bag]).unique() for i in range(len(top))
        ]
        self.orders, self.shifts = reorderings(mask).to(mask.device), insertion_shifts(mask)
        identity = torch.arange(mask.numel(), device=mask.device)
        # The sentences each reordering changes.
        self.moved = (self.orders != identity).view(len(self.orders), *mask.shape).any(-1)

    def sweep(
        self, ids: torch.Tensor, current: torch.Tensor, width: int, refine: bool, replace: bool
    ) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
        """One sweep from `ids` (score `current`): the ids, their score, solved or not, and
        whether replacements helped. With `replace` false the replacements are put off until
        the reorderings and insertions find nothing."""
        objective, before, solved = self.objective, current, False
        if replace:
            ids, current, solved = self.replacements(ids, current, width, refine)
        replaced = current < before
        if len(self.orders) and not (solved or self.settings.expired()):
            ids, current = self.reorder(ids, current)
            solved = objective.finished(ids, current)
        if not (solved or self.settings.expired()):
            ids, current = self.insert(ids, current, refine)
            solved = objective.finished(ids, current)
        if not (replace or solved or bool(current < before)):
            # Nothing else helped: the replacements put off till now.
            ids, current, solved = self.replacements(ids, current, width, refine)
            replaced = current < before
        return ids, current, solved, bool(replaced)

    def replacements(
        self, ids: torch.Tensor, current: torch.Tensor, width: int, refine: bool
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Each position of the open sentences in turn takes the best of its candidate tokens
        (`width` of them linearised, with each slot's own optimum's nearest if `refine`);
        solved or not."""
        objective, settings, mask = self.objective, self.settings, self.objective.content
        slopes = score_gradient(objective, ids.unsqueeze(0), 1)[0][mask]
        linearised = first_order_best(slopes, self.raw_vocab, self.candidates, width)
        if refine:  # stuck at the widest first-order ranks: each slot's own optimum
            where = mask.nonzero()
            optima = slot_optima(objective, ids.repeat(len(where), 1, 1), *where.T, settings)
            near = nearest(optima, self.vocab, self.candidates, settings.linearised)
            linearised = torch.cat([linearised, near], 1)
        searched = open_sentences(objective, ids)
        for (b, p), pool, extra, slope in zip(self.positions, self.pools, linearised, slopes):
            if not searched[b] or settings.expired():
                continue
            if settings.screen and len(pool) > settings.screen:
                pool = pool[(objective.embed(pool) @ slope).topk(settings.screen, largest=False)[1]]
            pool = torch.cat([pool, extra]).unique()
            trial = ids.repeat(len(pool), 1, 1)
            trial[:, b, p] = pool
            ids, current = take_best(objective, trial, self.per_pass, ids, current)
            # Once solved, the rest of the sweep (and its costlier moves) cannot improve it.
            if objective.finished(ids, current):
                return ids, current, True
        return ids, current, False

    def reorder(
        self, ids: torch.Tensor, current: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best of `moves` reorderings of the open sentences, if it lowers the score."""
        objective = self.objective
        searched = torch.tensor(open_sentences(objective, ids), device=ids.device)
        allowed = self.orders[~self.moved[:, ~searched].any(1)]
        change = first_order_change(first_order_gain(objective, ids)[1], allowed)
        chosen = allowed[promising(change, self.settings.moves, self.generator)]
        trial = ids.flatten()[chosen].view(len(chosen), *ids.shape)
        return take_best(objective, trial, self.per_pass, ids, current)

    def insert(
        self, ids: torch.Tensor, current: torch.Tensor, refine: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best insertion that shifts an open sentence, if it lowers the score."""
        objective = self.objective
        searched = open_sentences(objective, ids)
        shifted = shifted_insertions(
            objective, ids, within(self.shifts, searched, ids.shape[1]), self.raw_vocab,
            self.candidates, self.settings, self.generator, refine,
        )  # fmt: skip
        return take_best(objective, shifted, self.per_pass, ids, current)


def coordinate_descent(
    objective: SpanObjective,
    ids: torch.Tensor,
    current: torch.Tensor,
    x: torch.Tensor,
    vocab: torch.Tensor,
    raw_vocab: torch.Tensor,
    candidates: torch.Tensor,
    settings: DeepSettings,
    per_pass: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Coordinate descent over tokens from `ids` (whose continuous source is `x`).

    Returns the ids, their score and the sweeps run. A sweep that changes nothing is retried
    with `WIDEN` times the linearised tokens, up to `WIDEST` times; still stuck, a search of
    one sentence refines each slot alone.
    """
    sweeps = Sweeps(objective, x, vocab, raw_vocab, candidates, settings, per_pass, generator)
    done, width, refine, replace = 0, settings.linearised, False, True
    for _ in range(settings.sweeps):
        if settings.expired():
            break
        before = current
        ids, current, solved, replaced = sweeps.sweep(ids, current, width, refine, replace)
        done += 1
        if solved:
            break
        improved = bool(current < before)
        # Late in a search the words are right and their order is not: replacements that
        # find nothing while reorderings or insertions help are put off to the next sweeps.
        replace = replaced or not improved
        if improved:
            width, refine = settings.linearised, False
        elif width < settings.linearised * WIDEST:
            width *= WIDEN  # stuck: the missing token is often just beyond the linearised few
        elif not refine and settings.steps >= REFINE_SHARE and len(ids) == 1:
            refine = True  # one sentence (B = 1 or a view): each slot's copy runs one sentence
        else:
            break
    return ids, current, done


def open_sentences(objective: SpanObjective, ids: torch.Tensor) -> list[bool]:
    """Which sentences of `ids` (B, L) a sweep still searches: with several, those whose own
    inputs stray outside the span while another's lie in it (a sentence that fits is right,
    and trying its replacements and reorderings costs as much as a wrong one's); all of them
    otherwise."""
    outside = objective.sentence_outside(ids) if len(ids) > 1 else None
    if outside is None:
        return [True] * len(ids)
    open_ = (outside > SENTENCE_FITS).tolist()
    return open_ if any(open_) else [True] * len(ids)


def take_best(
    objective: SpanObjective,
    trial: torch.Tensor,
    per_pass: int,
    ids: torch.Tensor,
    current: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids` or the best of `trial` (K, B, L) if it scores lower.

    With a rough objective, it ranks the candidates and only its best are scored at full
    precision (a move is taken on its full-precision score alone): the `ROUGH_KEEP` best, and
    every one it cannot tell from its best, `ROUGH_NOISE` times its error on `ids` away (where
    the candidates' scores differ by less than its precision, all of them).
    """
    if not len(trial):  # e.g. deep_moves=0
        return ids, current
    if objective.rough is not None and len(trial) > ROUGH_KEEP:
        rough = _scores(objective.rough, torch.cat([ids.unsqueeze(0), trial]), per_pass, ids)
        error, rough = (rough[0] - current).abs(), rough[1:]
        keep = rough <= rough.min() + ROUGH_NOISE * error
        keep[rough.topk(ROUGH_KEEP, largest=False).indices] = True
        trial = trial[keep]
    scores = _scores(objective, trial, per_pass, ids)
    i = scores.argmin()
    better = scores[i] < current
    return torch.where(better, trial[i], ids), torch.minimum(scores[i], current)


def _scores(
    objective: SpanObjective, trial: torch.Tensor, per_pass: int, ids: torch.Tensor
) -> torch.Tensor:
    """Scores (K,) of candidate batches `trial` (K, B, L) near `ids`. A candidate that changes
    one sentence is scored by running that sentence alone (see `score_variants`); one host
    sync per call sorts them out."""
    changed = (trial != ids).any(-1)  # (K, B)
    alone = changed.sum(1) == 1
    scores = torch.empty(len(trial), dtype=objective.precision, device=ids.device)
    for b in range(ids.shape[0]):
        rows = (alone & changed[:, b]).nonzero().flatten()
        if len(rows):
            scores[rows] = objective.score_variants(ids, b, trial[rows, b], per_pass)
    rows = (~alone).nonzero().flatten()
    if len(rows):
        scores[rows] = objective.score_ids(trial[rows], per_pass)
    return scores
