"""Where a model's embedding dropout sits, and each slot's dropped-out inputs found in the span.

The robust test (`masks`) assumes BERT's order: dropout right after the embedding LayerNorm, so
a layer-0 input is `m * u / (1 - p)`. `embedding_dropout` checks that order on the model itself
(one embedding pass in training mode) and says why when it does not hold; `find_rows` finds,
slot by slot, the (token, mask) pairs whose inputs lie in the span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradaudit.attacks.span.exact.masks import (
    MASK_EXACT,
    exact_masks,
    fit_masks,
    most_dropped,
    span_projection,
)
from gradaudit.attacks.span.exact.screening import layer0_inputs
from gradaudit.model.families import ModelLayout

REPEAT_DRAWS = 32  # random-cost fits per mask sought of a token several sentences hold
PLAUSIBLE = 0.02  # ranking residual below which a candidate gets the exact (MILP) check


def embedding_dropout(lay: ModelLayout) -> tuple[float, str]:
    """The embedding dropout rate from the config and why the robust test cannot model it
    ("" when it can): one training-mode pass of the embeddings must give, per coordinate,
    either 0 or LayerNorm's output / (1 - p)."""
    rate = getattr(lay.model.config, "hidden_dropout_prob", None)
    if not lay.bert_embeddings or lay.family.embedding_norm is None:
        return float(rate or 0.0), f"the {lay.family.name} family has no embedding LayerNorm"
    if rate is None:
        return 0.0, "the config names no hidden_dropout_prob"
    if rate <= 0:
        return 0.0, ""
    embeddings = lay.submodule(lay.family.embedding_norm.rsplit(".", 1)[0])
    device = lay.word_embeddings.weight.device
    ids = torch.arange(1, 9, device=device)[None]
    devices = [device] if device.type == "cuda" else []
    mode = embeddings.training
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            embeddings.train()
            out = embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))[0]
    except TypeError as error:
        return float(rate), f"its embeddings cannot be run alone ({error})"
    finally:
        embeddings.train(mode)
    pos = lay.position_ids(torch.ones_like(ids))[0]
    offsets = lay.position_embeddings.weight.detach()[pos] + lay.token_type_embeddings.weight[0]
    u = layer0_inputs(lay, ids[0], offsets.detach().double()) / (1 - rate)
    out = out.double()
    fits = ((out - u).abs() <= 1e-4 * u.abs().clamp_min(1e-3)) | (out == 0)
    if not bool(fits.all()) or not bool((out == 0).any()):
        return float(rate), (
            "its embedding output is not LayerNorm's output with coordinates dropped (dropout "
            "elsewhere, e.g. before the LayerNorm)"
        )
    return float(rate), ""


@dataclass
class FoundRows:
    """The inputs found in the span: token, slot index and exact input row of each."""

    tokens: list[int]
    slots: list[int]
    inputs: list[torch.Tensor]

    def stack(self) -> torch.Tensor:
        return torch.stack(self.inputs) if self.inputs else torch.zeros(0)


def find_rows(
    lay: ModelLayout,
    basis: torch.Tensor,
    offsets: torch.Tensor,
    candidates: list[torch.Tensor],
    counts: list[int],
    rate: float,
    orthogonal: torch.Tensor,
) -> FoundRows:
    """Per slot `j` (position + segment embedding `offsets[j]`), up to `counts[j]` inputs
    `m * u / (1 - p)` in the span among its `candidates[j]` tokens: ranked together
    (`fit_masks`), then, while a slot lacks inputs, its plausible tokens checked exactly
    (`exact_mask`), also for a second mask of a token found once (two sentences holding it)."""
    most = most_dropped(basis.shape[1], rate)
    sizes = [len(c) for c in candidates]
    flat = torch.cat(candidates)
    slot_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    inputs = layer0_inputs(lay, flat.to(offsets.device), offsets[slot_of]) / (1 - rate)
    fit = fit_masks(inputs, span_projection(basis), most)
    found = FoundRows([], [], [])
    start = 0
    for j, size in enumerate(sizes):
        part = slice(start, start + size)
        start += size
        res, kept, rows = fit.residual[part], fit.kept[part], inputs[part]
        order = res.argsort().tolist()
        chosen: list[tuple[int, torch.Tensor]] = [
            (i, kept[i]) for i in order if res[i] < MASK_EXACT
        ]
        for i in order:
            if len(chosen) >= counts[j] or not res[i] < PLAUSIBLE:
                break
            if res[i] >= MASK_EXACT:
                mask = exact_masks(rows[i][None], orthogonal, most)
                if mask is not None:
                    chosen.append((i, mask[0]))
        for i, first in sorted(chosen, key=lambda c: c[0]):  # a token two sentences hold
            if len(chosen) >= counts[j]:
                break
            more = other_masks(rows[i], first, basis, most, orthogonal, counts[j] - len(chosen))
            chosen.extend((i, mask) for mask in more)
        for i, mask in chosen[: counts[j]]:
            found.tokens.append(int(candidates[j][i]))
            found.slots.append(j)
            found.inputs.append(rows[i] * mask)
    return found


def other_masks(
    row: torch.Tensor,
    first: torch.Tensor,
    basis: torch.Tensor,
    most: int,
    orthogonal: torch.Tensor,
    wanted: int,
) -> list[torch.Tensor]:
    """Up to `wanted` more masks (other than `first`) putting `row` in the span: several
    sentences' tokens at one slot (every [CLS]). Random costs per dropped coordinate
    (log-normal, widely spread) make each mask the cheapest for some draws (one batched fit);
    then the MILP, excluding those found."""
    generator = torch.Generator().manual_seed(0)
    draws = REPEAT_DRAWS * (wanted + 1)
    costs = (3 * torch.randn(draws, len(row), generator=generator, dtype=row.dtype)).exp()
    fit = fit_masks(row.expand(draws, -1), span_projection(basis), most, costs.to(row.device))
    masks = [first]
    for k in fit.residual.argsort().tolist():
        if fit.residual[k] < MASK_EXACT and not any(bool((fit.kept[k] == m).all()) for m in masks):
            masks.append(fit.kept[k])
    while len(masks) <= wanted:
        more = exact_masks(row[None], orthogonal, most, tuple(masks), time_limit=20.0)
        if more is None:
            break
        masks.append(more[0])
    return masks[1 : wanted + 1]
