"""Deep mode's order polish: swaps of a sentence's tokens kept where the gradient matches better.

In the partial regime (a LoRA lora_A with r below the tokens) only the reverse span test holds,
and at layer 0, where inputs carry no context, it pins the words down better than their order.
The gradient's values (not only its row space) depend on the order: each swap of two tokens of
one sentence is scored by gradmatch's cosine distance to the observed gradient, all swaps of a
sentence in batched passes, and the best kept while it lowers the distance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradaudit.attacks.gradmatch import GradientMatcher

MIN_GAIN = 1e-6  # a swap must lower the cosine distance by more than this
# Sentence forwards a sweep may take (swaps x the batch's sentences, as each swap runs the whole
# batch): a 40-token sentence alone takes 780; past the cap the polish is skipped, and says so.
MAX_SWEEP_FORWARDS = 4096


def sentence_swaps(ids: torch.Tensor, content: torch.Tensor, sentence: int) -> torch.Tensor:
    """Every batch (K, B, L) that differs from `ids` by one swap of two distinct tokens at
    content positions of `sentence`."""
    positions = content[sentence].nonzero().flatten()
    i, j = torch.triu_indices(len(positions), len(positions), offset=1, device=ids.device)
    i, j = positions[i], positions[j]
    distinct = ids[sentence, i] != ids[sentence, j]
    i, j = i[distinct], j[distinct]
    variants = ids.unsqueeze(0).repeat(len(i), 1, 1)
    rows = torch.arange(len(i), device=ids.device)
    variants[rows, sentence, i] = ids[sentence, j]
    variants[rows, sentence, j] = ids[sentence, i]
    return variants


def polish_order(
    matcher: GradientMatcher,
    embed: Any,
    ids: torch.Tensor,
    content: torch.Tensor,
    sweeps: int,
    per_pass: int,
    expired: Callable[[], bool] = lambda: False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`ids` (B, L) after up to `sweeps` sweeps of best-swap moves per sentence (fewer once
    `expired()`), scored by `matcher` on `embed(ids)`; the details record the distance before
    and after."""
    swaps = sum(len(sentence_swaps(ids, content, b)) for b in range(len(ids)))
    if swaps * len(ids) > MAX_SWEEP_FORWARDS:
        return ids, {"polish": f"skipped: {swaps} swaps x {len(ids)} sentences a sweep"}
    current = matcher.losses(embed(ids).unsqueeze(0)).detach()[0]
    start, kept = float(current), 0
    for _ in range(sweeps):
        improved = False
        for sentence in range(len(ids)):
            variants = sentence_swaps(ids, content, sentence)
            if not len(variants) or expired():
                continue
            scores = torch.cat(
                [matcher.losses(embed(part)).detach() for part in variants.split(per_pass)]
            )
            best = int(scores.argmin())
            if bool(scores[best] < current - MIN_GAIN):
                ids, current, kept, improved = variants[best], scores[best], kept + 1, True
        if not improved:
            break
    return ids, {"polish_distance": [start, float(current)], "polish_swaps": kept}
