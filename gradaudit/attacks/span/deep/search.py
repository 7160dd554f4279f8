"""Deep mode's search: continuous starts, coordinate descent from the best, kicks and restarts.

Discrete searches run from the best-scoring fresh start, then from a kick of the best result
(continuous restarts drawn around its tokens: a stuck result is mostly right and its fix
changes several tokens at once), then from the second-best fresh start, until solved. With
several sentences, those left wrong are searched again alone, the others held, before the next
search: cheaper than a joint search, which mostly gets the same sentences right. On a gradient
taken with dropout on, which no candidate fits exactly, a kick whose restarts all round back
onto the result ends the search: it is the best the search can confirm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gradaudit.attacks.span.deep.continuous import (
    kicked_start,
    optimise_embeddings,
    round_to_tokens,
)
from gradaudit.attacks.span.deep.descent import coordinate_descent
from gradaudit.attacks.span.deep.objective import SENTENCE_FITS, DeepSettings, SpanObjective

# Discrete searches while unsolved, in order: from the best-scoring fresh start, from a kick of
# the best result so far, from the second-best fresh start.
SEARCHES = ("start", "kick", "start")


def deep_search(
    objective: SpanObjective,
    candidates: torch.Tensor,
    settings: DeepSettings,
    seed: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids (B, L) minimising `objective` over `candidates` at content positions."""
    device = objective.content.device
    generator = torch.Generator().manual_seed(seed)
    candidates = candidates.to(device)
    raw_vocab = objective.embeddings[candidates]
    vocab = F.normalize(raw_vocab, dim=-1)
    x, continuous = optimise_embeddings(objective, settings, generator)
    per_pass = max(1, settings.forward_batch // objective.content.shape[0])
    starts, start_scores = round_to_tokens(objective, x, vocab, candidates, per_pass)
    # Discrete searches (`SEARCHES`) until solved; see the module docstring.
    order = start_scores.argsort().tolist()
    ids, current, sweeps, searched, kicks = starts[order[0]], start_scores[order[0]], 0, 0, []
    fresh = iter(order)
    again: list[int] = []
    agreed = False
    for kind in SEARCHES:
        if settings.expired():
            break
        if kind == "kick":
            start, start_score, source = kicked_start(
                objective, ids, vocab, candidates, settings, per_pass, generator
            )
            kicks.append(float(start_score))
            if settings.noisy and torch.equal(start, ids):
                agreed = True
                break
        elif (k := next(fresh, None)) is not None:
            start, start_score, source = starts[k], start_scores[k], x[k]
        else:
            continue  # fewer restarts than fresh starts in `SEARCHES`
        found, score, done = coordinate_descent(
            objective, start, start_score, source, vocab, raw_vocab, candidates, settings,
            per_pass, generator,
        )  # fmt: skip
        sweeps, searched = sweeps + done, searched + 1
        if len(found) > 1 and not objective.finished(found, score):
            found, score, replaced = search_sentences_again(
                objective, found, score, candidates, settings, seed + searched * len(found)
            )
            again += replaced
        if bool(score <= current):
            ids, current = found, score
        if objective.finished(ids, current):
            break
    details = {
        "continuous_residuals": continuous.tolist(),
        "start_residuals": start_scores.tolist(),
        "searches": searched,
        "kicked_start_residuals": kicks,
        "sweeps": sweeps,
    }
    if len(ids) > 1:
        details["sentences_searched_again"] = again
    if settings.noisy:
        details["kick_agreed"] = agreed
    return ids, {**details, "residual": float(current)}


def search_sentences_again(
    objective: SpanObjective,
    ids: torch.Tensor,
    current: torch.Tensor,
    candidates: torch.Tensor,
    settings: DeepSettings,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each sentence whose inputs stray outside the observed span, worst first, searched
    again from fresh starts with the others held fixed; kept where the batch's score drops.
    Then, while that leaves more sentences fitting, passes that hold only the sentences that
    fit (a wrong sentence may hold the words another one needs) and keep a sentence where its
    own inputs fit better. Returns the ids, their score and the sentences replaced."""
    replaced: list[int] = []
    hold_wrong, fitting = True, 0
    while not settings.expired():
        outside = objective.sentence_outside(ids)
        if outside is None or objective.finished(ids, current):
            break
        fits = outside <= SENTENCE_FITS
        if not hold_wrong:
            if int(fits.sum()) <= fitting:
                break
            fitting = int(fits.sum())
        tried, score, changed = ids, current, []
        for b in outside.argsort(descending=True).tolist():
            if bool(fits[b]) or settings.expired():
                break
            held = [c for c in range(len(ids)) if c != b and (hold_wrong or bool(fits[c]))]
            view = objective.holding(tried, b, held)
            found, info = deep_search(view, candidates, settings, seed + b)
            own = view.sentence_outside(found)[0]  # the view runs sentence b alone
            trial = tried.clone()
            trial[b] = found[0]
            # Held others: the view scores the whole batch; left out: only its own fit counts.
            better = info["residual"] < float(score) if hold_wrong else bool(own < outside[b])
            if better:
                tried, score = trial, objective.score_ids(trial.unsqueeze(0), 1)[0]
                fits[b] = own <= SENTENCE_FITS
                changed.append(b)
        if bool(score < current):  # a pass that leaves the batch worse is dropped
            ids, current, replaced = tried, score, replaced + changed
        hold_wrong = False
    return ids, current, replaced
