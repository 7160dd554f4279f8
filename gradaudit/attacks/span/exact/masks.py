"""Dropout-robust membership: does some dropout mask put a candidate input in the row space?

In train mode a layer-0 input is `x = m * u / (1 - p)`: `u` the candidate's LayerNorm output,
`m` a 0/1 mask. A candidate belongs iff some mask puts `m * u` in the row space `V`; a mask
that does (relative residual ~1e-7) is its certificate. `box_masks` (the box relaxation) and
`decode_masks` (sparse-error decoding) fit masks to many candidates at once by ADMM,
`descend_masks` makes them exact one coordinate at a time; batched tensor operations on any
device. Method: docs/span-method.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_EXACT = 1e-4  # relative residual of a masked input in the span (the truth: 1e-7 to 1e-5)
ADMM_STEPS = 300  # of `decode_masks` (key modules: 50 left 9 of a sentence's 10 rows inexact)
BOX_STEPS = 300  # ADMM steps of `box_masks` (100 left 1 of 40 true tokens unfound, 300 none)
DESCENT_STEPS = 256  # one-coordinate flips per row at most (random starts need ~100)
DESCENT_CHECK = 16  # flips between checks whether any row still moves
OUTLIER_SHARE = 0.125  # of |a|^2: an anchor coordinate this large is decoded dropped and kept


@dataclass(frozen=True)
class MaskFit:
    """Per candidate: the relative residual of its masked input and the mask (1 kept); with an
    anchor (key modules), the anchor's mask each candidate implies."""

    residual: torch.Tensor  # n
    kept: torch.Tensor  # n x width, bool
    anchor_kept: torch.Tensor | None = None  # n x width, bool


def most_dropped(width: int, rate: float) -> int:
    """The most coordinates a dropout mask of `rate` plausibly drops: 6 deviations above the
    mean (a mask dropping more explains anything: all dropped is in every span)."""
    return int(width * rate + 6 * (width * rate * (1 - rate)) ** 0.5) + 1


def masked_residual(
    inputs: torch.Tensor, kept: torch.Tensor, basis: torch.Tensor, most: int
) -> torch.Tensor:
    """Relative residual of `inputs * kept` (n x width) against the row space `basis`; inf
    where the mask drops more than `most` coordinates."""
    return off_span(inputs * kept, basis).masked_fill((~kept).sum(-1) > most, float("inf"))


def off_span(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Relative residual of each row of `x` against the row space `basis`."""
    return (x - (x @ basis.T) @ basis).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-300)


def box_masks(
    inputs: torch.Tensor,
    basis: torch.Tensor,
    most: int,
    anchor: torch.Tensor | None = None,
    cost: torch.Tensor | None = None,
) -> MaskFit:
    """Each row's mask from the box relaxation: ADMM on `min sum(y)`, `0 <= y <= 1`, with
    `u * (1 - y)` in the span (the y-step closed-form per coordinate, the other a
    projection), rounded at 1/2. The optimum is fractional once the span is wide, but its
    rounding lies within a few coordinates of the true mask where sparse-error decoding
    fails: a frequent token whose other occurrences put it near the span. With `anchor` (key
    modules) the row and the anchor are masked together: `u * (1 - y) - a * (1 - y_a)` in
    the span (SST-2 dev 8-15, B = 8, rank 226: 18 of 226 true rows exact after the descent,
    in 7 of 8 sentences, against 2 rows from the decoding). `cost` (like `inputs`, query and
    value): each coordinate's price of being dropped, 1 by default."""
    width = inputs.shape[1]
    u = inputs if anchor is None else torch.cat([inputs, -anchor.expand_as(inputs)], 1)
    rho = 1 / u.square().mean(-1, keepdim=True)
    inverse = 1 / (rho * u.square().clamp_min(1e-30))
    if cost is not None:
        inverse = inverse * cost
    safe = torch.where(u.abs() > 1e-15, u, torch.full_like(u, 1e-15))
    z = _box_projection(u, basis, width)
    w = torch.zeros_like(u)
    y = w
    for _ in range(BOX_STEPS):
        y = ((u - z + w) / safe - inverse).clamp(0, 1)
        x = u * (1 - y) + w
        z = _box_projection(x, basis, width)
        w = x - z
    kept = y < 0.5
    if anchor is None:
        return MaskFit(masked_residual(u, kept, basis, most), kept)
    return anchored_fit(inputs, kept[:, :width], anchor, kept[:, width:], basis, most)


def _box_projection(x: torch.Tensor, basis: torch.Tensor, width: int) -> torch.Tensor:
    """`x` onto the span, or, for (row, anchor) pairs `[v, w]` (twice the width), onto the
    pairs whose sum `v + w` lies in it: each half loses half of the sum's part outside."""
    if x.shape[1] == width:
        return (x @ basis.T) @ basis
    total = x[:, :width] + x[:, width:]
    outside = (total - (total @ basis.T) @ basis) / 2
    return x - torch.cat([outside, outside], 1)


def decode_masks(
    inputs: torch.Tensor,
    basis: torch.Tensor,
    most: int,
    anchor: torch.Tensor | None = None,
    dropped: tuple[int, ...] = (),
) -> MaskFit:
    """Each row's mask (and, with `anchor`, the anchor's) by sparse-error decoding.

    A true row `u` (scaled by 1 / (1 - p)) differs from a vector of the span `W` in few
    coordinates: its dropped ones (error `u_i`). For a key module `W` is the span plus the
    unmasked anchor `a` (the first token's input): the row minus its sentence's masked anchor is
    in the span, so the error is also `-a_i` where the anchor was dropped, `u_i - a_i` where
    both were. ADMM on `min |e|_1` with `u - e` in `W` (soft thresholding and a
    projection, batched), then each coordinate's error snapped to the nearest of those values;
    the residual is that of the masked row (minus the masked anchor) against the span.
    `dropped`: anchor coordinates taken as dropped (`anchor_outliers`).
    """
    full = anchor
    if anchor is not None and dropped:
        anchor = anchor.clone()
        anchor[list(dropped)] = 0
    span = basis if anchor is None else torch.linalg.qr(torch.cat([basis, anchor[None]]).T).Q.T
    u = inputs
    weight = u.abs().mean(-1, keepdim=True)
    z = (u @ span.T) @ span
    w = torch.zeros_like(u)
    for _ in range(ADMM_STEPS):
        e = u - z + w
        e = e.sign() * (e.abs() - weight).clamp_min(0)
        z = ((u - e + w) @ span.T) @ span
        w = w + u - e - z
    e = u - z
    zero = torch.zeros_like(u)
    if anchor is None:
        kept = (e - zero).abs() <= (e - u).abs()
        return MaskFit(masked_residual(u, kept, basis, most), kept)
    a = anchor.expand_as(u)
    state = (e[None] - torch.stack([zero, u, -a, u - a])).abs().argmin(0)
    kept, anchor_kept = (state == 0) | (state == 2), (state == 0) | (state == 1)
    anchor_kept[:, list(dropped)] = False
    return anchored_fit(u, kept, full, anchor_kept, basis, most)


def anchor_outliers(anchor: torch.Tensor) -> list[tuple[int, ...]]:
    """The anchor coordinates to decode as dropped, every subset of its outliers (each holding
    over `OUTLIER_SHARE` of |a|^2; at most three): a dropped outlier is an error far larger
    than the rest, which the l1 decoding spreads instead. MiniLM's first-token input holds
    7.04 in one coordinate (median 0.07); CoLA dev 4-7: with it dropped none of a sentence's
    12 rows decoded exactly, all 12 with it decoded dropped."""
    big = (anchor.square() > OUTLIER_SHARE * anchor.square().sum()).nonzero().flatten()[:3]
    subsets = [()]
    for i in big.tolist():
        subsets += [(*s, i) for s in subsets]
    return subsets


def best_fit(fits: list[MaskFit]) -> MaskFit:
    """Per row, the fit of least residual among `fits` (fits of the same rows)."""
    at = torch.stack([f.residual for f in fits]).argmin(0)
    rows = torch.arange(len(at), device=at.device)

    def pick(name: str) -> torch.Tensor | None:
        parts = [getattr(f, name) for f in fits]
        return None if parts[0] is None else torch.stack(parts)[at, rows]

    return MaskFit(pick("residual"), pick("kept"), pick("anchor_kept"))


def anchored_fit(
    inputs: torch.Tensor,
    kept: torch.Tensor,
    anchor: torch.Tensor,
    anchor_kept: torch.Tensor,
    basis: torch.Tensor,
    most: int,
) -> MaskFit:
    """A key module's fit: the relative residual of each masked row minus its masked anchor
    against the span (inf where either mask drops more than `most`)."""
    residual = off_span(inputs * kept - anchor * anchor_kept, basis)
    too_many = ((~kept).sum(-1) > most) | ((~anchor_kept).sum(-1) > most)
    return MaskFit(residual.masked_fill(too_many, float("inf")), kept, anchor_kept)


def descend_masks(
    fit: MaskFit,
    inputs: torch.Tensor,
    basis: torch.Tensor,
    most: int,
    anchor: torch.Tensor | None = None,
) -> MaskFit:
    """`fit`'s masks improved one coordinate at a time: each step flips, per row, the
    coordinate that lowers the squared distance of the masked row (minus its masked anchor,
    for key modules) from the span most, until no flip lowers it.

    ADMM's rounded masks are often a few coordinates off (relative residual 1e-3 to 0.1 for
    true tokens at B = 8, where the span is wide); from there the flips reach the exact mask
    (1e-7), while a false token stays far (0.05 and up). With `P` the complement's projector and
    `q = P x`, flipping coordinate `i` changes `|P x|^2` by `2 s x_i q_i + x_i^2 P_ii` (`s` +1
    to keep, -1 to drop) and `q` by `s x_i P_i`: O(width) per row and step, no matmul.
    """
    width = inputs.shape[1]
    off = torch.eye(width, dtype=basis.dtype, device=basis.device) - basis.T @ basis
    if anchor is None:
        x, m = inputs, fit.kept
    else:
        x = torch.cat([inputs, -anchor.expand_as(inputs)], 1)
        m, off = torch.cat([fit.kept, fit.anchor_kept], 1), off.repeat(2, 2)
    m = m.to(x.dtype)
    out = m.clone()
    q = (m * x) @ off
    change = (1 - 2 * m) * x  # what flipping each coordinate adds to the masked row
    cost = x.square() * off.diagonal()
    index = torch.arange(len(x), device=x.device)
    for step in range(DESCENT_STEPS):
        gain, at = torch.addcmul(cost, change, q, value=2).min(1)
        move = gain < 0
        rows = torch.arange(len(at), device=x.device)
        q.addcmul_(torch.where(move, change[rows, at], 0)[:, None], off[at])
        change[rows, at] = torch.where(move, -change[rows, at], change[rows, at])
        m[rows, at] = torch.where(move, 1 - m[rows, at], m[rows, at])
        if step % DESCENT_CHECK == DESCENT_CHECK - 1:  # rows at a local minimum stay there
            out[index] = m
            if not bool(move.any()):
                break
            index, q, change, cost, m = index[move], q[move], change[move], cost[move], m[move]
    out[index] = m
    m = out
    kept = m[:, :width] > 0.5
    if anchor is None:
        return MaskFit(masked_residual(inputs, kept, basis, most), kept)
    return anchored_fit(inputs, kept, anchor, m[:, width:] > 0.5, basis, most)
