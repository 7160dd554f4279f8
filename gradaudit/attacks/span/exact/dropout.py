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
    MaskFit,
    complement,
    decode_masks,
    exact_masks,
    fit_masks,
    masked_residual,
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
    """The inputs found in the span: token, slot index and exact input row of each; for a key
    module also the mask of its sentence's first token (which sentence it is in)."""

    tokens: list[int]
    slots: list[int]
    inputs: list[torch.Tensor]
    anchors: list[torch.Tensor]

    def stack(self) -> torch.Tensor:
        return torch.stack(self.inputs) if self.inputs else torch.zeros(0)


Masks = tuple[torch.Tensor, torch.Tensor | None]  # a row's mask, its anchor's (key modules)


@dataclass
class Finder:
    """The dropout-robust tests against one row space: `anchor` (key modules) is the unmasked
    first-token input whose masked copy each row differs from by a vector of the span."""

    basis: torch.Tensor
    most: int
    anchor: torch.Tensor | None

    def __post_init__(self) -> None:
        self.orthogonal = complement(self.basis)

    def rank(self, inputs: torch.Tensor, costs: torch.Tensor | None = None) -> MaskFit:
        """Masks for many rows at once: for query and value the better of sparse-error
        decoding (100 of 104 true inputs at B = 8) and the box relaxation (85, some others)."""
        if self.anchor is not None:
            return decode_masks(inputs, self.basis, self.most, self.anchor, costs)
        box = fit_masks(inputs, span_projection(self.basis), self.most, costs)
        if costs is not None:
            return box
        decoded = decode_masks(inputs, self.basis, self.most)
        better = (box.residual < decoded.residual)[:, None]
        kept = torch.where(better, box.kept, decoded.kept)
        return MaskFit(torch.minimum(box.residual, decoded.residual), kept)

    def exact(self, row: torch.Tensor, exclude: tuple[torch.Tensor, ...] = ()) -> Masks | None:
        """The MILP's mask of `row` (query and value only: the key's pair MILP is too slow)."""
        if self.anchor is not None:
            return None
        found = exact_masks(row[None], self.orthogonal, self.most, exclude, time_limit=20.0)
        if found is None:
            return None
        residual = masked_residual(row[None], found, span_projection(self.basis), self.most)
        return (found[0], None) if residual[0] < MASK_EXACT else None

    def others(self, row: torch.Tensor, first: Masks, wanted: int) -> list[Masks]:
        """Up to `wanted` more masks of `row` than `first`: several sentences' tokens at one
        slot (every [CLS]). Random costs per dropped coordinate (log-normal, widely spread) make
        each mask the cheapest for some draws (one batched fit); then the MILP."""
        generator = torch.Generator().manual_seed(0)
        draws = REPEAT_DRAWS * (wanted + 1)
        costs = (3 * torch.randn(draws, len(row), generator=generator, dtype=row.dtype)).exp()
        fit = self.rank(row.expand(draws, -1), costs.to(row.device))
        masks = [first]
        for k in fit.residual.argsort().tolist():
            new = (fit.kept[k], None if fit.anchor_kept is None else fit.anchor_kept[k])
            if fit.residual[k] < MASK_EXACT and not any(_same(new, m) for m in masks):
                masks.append(new)
        while len(masks) <= wanted:
            more = self.exact(row, tuple(m[0] for m in masks))
            if more is None:
                break
            masks.append(more)
        return masks[1 : wanted + 1]


def _same(a: Masks, b: Masks) -> bool:
    return all(x is None or bool((x == y).all()) for x, y in zip(a, b))


def find_rows(
    lay: ModelLayout,
    finder: Finder,
    offsets: torch.Tensor,
    candidates: list[torch.Tensor],
    counts: list[int],
    rate: float,
) -> FoundRows:
    """Per slot `j` (position + segment embedding `offsets[j]`), up to `counts[j]` inputs
    `m * u / (1 - p)` in the span among its `candidates[j]` tokens: ranked together
    (`Finder.rank`), then, while a slot lacks inputs, its plausible tokens checked exactly
    (`Finder.exact`), and more masks of the tokens found (two sentences holding one)."""
    sizes = [len(c) for c in candidates]
    slot_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    inputs = layer0_inputs(lay, torch.cat(candidates).to(offsets.device), offsets[slot_of])
    inputs = inputs / (1 - rate)
    fit = finder.rank(inputs)
    found = FoundRows([], [], [], [])
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    for j, size in enumerate(sizes):
        part = slice(starts[j], starts[j] + size)
        res, rows = fit.residual[part], inputs[part]
        anchors = fit.anchor_kept[part] if fit.anchor_kept is not None else [None] * size
        order = res.argsort().tolist()
        chosen = [(i, (fit.kept[part][i], anchors[i])) for i in order if res[i] < MASK_EXACT]
        for i in order:
            if len(chosen) >= counts[j] or not res[i] < PLAUSIBLE:
                break
            masks = finder.exact(rows[i]) if res[i] >= MASK_EXACT else None
            if masks is not None:
                chosen.append((i, masks))
        for i, first in sorted(chosen, key=lambda c: c[0]):  # a token two sentences hold
            if len(chosen) >= counts[j]:
                break
            chosen.extend((i, m) for m in finder.others(rows[i], first, counts[j] - len(chosen)))
        for i, (kept, anchor) in chosen[: counts[j]]:
            found.tokens.append(int(candidates[j][i]))
            found.slots.append(j)
            found.inputs.append(rows[i] * kept)
            found.anchors.append(anchor)
    return found
