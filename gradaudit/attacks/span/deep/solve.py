"""Deep mode: a batch recovered from linear modules past layer 0 whose gradients have a span.

The span objective over the usable modules is searched (`deep_search`) with the attack's
options scaled by the budget; the result's gradient-matching cosine, computed with gradmatch's
matcher, checks it against the gradient itself and not just its row space.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import candidate_token_ids, content_mask
from gradaudit.attacks.gradmatch import GradientMatcher, GradMatchOptions
from gradaudit.attacks.precision import rough_dtype
from gradaudit.attacks.span.deep.objective import SOLVED, DeepSettings, SpanObjective
from gradaudit.attacks.span.deep.polish import polish_order
from gradaudit.attacks.span.deep.search import deep_search
from gradaudit.attacks.span.options import SpanOptions
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.gradients.spectrum import Spectrum
from gradaudit.model.families import ModelLayout


def deep_settings(options: SpanOptions, budget: float, noisy: bool = False) -> DeepSettings:
    """The search sizes of `options`, the steps and sweeps scaled by `budget`; `noisy` for a
    gradient taken with dropout on."""
    return DeepSettings(
        steps=round(options.deep_steps * budget),
        restarts=options.deep_restarts,
        lr=options.deep_lr,
        neighbours=options.deep_neighbours,
        bag=options.deep_bag,
        linearised=options.deep_linearised,
        screen=options.deep_screen,
        inserts=options.deep_inserts,
        sweeps=max(1, round(options.deep_sweeps * budget)),
        moves=options.deep_moves,
        forward_batch=options.forward_batch,
        deadline=time.perf_counter() + options.deep_seconds * budget
        if options.deep_seconds
        else math.inf,
        noisy=noisy,
    )


def solve_deep(
    model: nn.Module,
    snapshot: GradientSnapshot,
    lay: ModelLayout,
    usable: dict[str, Spectrum],
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    budget: float,
    options: SpanOptions,
    partial: bool = False,
    noisy: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The batch's ids (B, L) from the `usable` modules' spectra (a `noisy` gradient: taken
    with dropout on), and the details the result reports (the search's, the rough dtype, the
    order polish's in the `partial` regime, and the gradient check's cosine)."""
    device = next(iter(usable.values())).basis.device
    content = content_mask(snapshot, tokenizer)
    bases = {m: s.basis for m, s in usable.items()}
    rough = rough_dtype(options.rough_dtype, device)
    objective = SpanObjective(model, lay, snapshot, bases, content, device, rough)
    settings = deep_settings(options, budget, noisy)
    ids, details = deep_search(objective, candidate_token_ids(tokenizer), settings, seed)
    details["rough_dtype"] = str(rough).removeprefix("torch.") if objective.rough else "none"
    polish = partial and options.polish_sweeps > 0 and details["residual"] >= SOLVED
    if polish or options.gradient_check:
        matcher = GradientMatcher(
            model, snapshot, tokenizer, device, GradMatchOptions(reg_weight=0)
        )
    if polish:
        sweeps, per_pass = max(1, round(options.polish_sweeps * budget)), options.forward_batch
        content = objective.content
        ids, polished = polish_order(
            matcher, objective.embed, ids, content, sweeps, per_pass, settings.expired
        )
        details.update(polished)
    if options.gradient_check:
        distance = matcher.losses(objective.embed(ids).unsqueeze(0))[0]
        details["gradient_cosine"] = 1 - float(distance.detach())
    if settings.stopped:
        details["out_of_time"] = (
            f"stopped at its {options.deep_seconds * budget:g} s limit (deep_seconds x budget) "
            "with the best batch so far: a longer search may recover more"
        )
    return ids.cpu(), details
