"""Dropout-robust membership: does some dropout mask put a candidate input in the row space?

In train mode a layer-0 input is `x = m * u / (1 - p)`: `u` the candidate's LayerNorm output,
`m` a 0/1 mask. A candidate belongs iff some mask puts `m * u` in the row space `V`.
`fit_masks` ranks many candidates at once (ADMM on the box relaxation, then alternating
projection; batched matmuls, any device); `lp_mask` is the relaxation's exact solution and
`exact_mask` the mask itself (scipy's HiGHS, LP resp. MILP). Method: docs/span-method.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

MASK_EXACT = 1e-4  # relative residual of a masked input in the span (the truth: 1e-7 to 1e-5)
ADMM_STEPS = 300  # ADMM steps of `fit_masks`
POLISH_STEPS = 30  # alternating-projection steps after them
TOLERANCE = 1e-5  # of |u|, per constraint: how far off the span the programmes let an input be


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


Projection = Callable[[torch.Tensor], torch.Tensor]


def span_projection(basis: torch.Tensor) -> Projection:
    """Orthogonal projection of rows onto the row space `basis`."""
    return lambda x: (x @ basis.T) @ basis


def masked_residual(
    inputs: torch.Tensor, kept: torch.Tensor, project: Projection, most: int
) -> torch.Tensor:
    """Relative residual of `inputs * kept` (n x width) against the projection's space; inf
    where the mask drops more than `most` coordinates."""
    x = inputs * kept
    out = (x - project(x)).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-300)
    return out.masked_fill((~kept).sum(-1) > most, float("inf"))


def fit_masks(
    inputs: torch.Tensor, project: Projection, most: int, costs: torch.Tensor | None = None
) -> MaskFit:
    """Best mask found for each row of `inputs` (n x width, already scaled by 1 / (1 - p)).

    ADMM on `min sum(y)` over the box with `u * (1 - y)` in the span (the y-step is per
    coordinate, the other a projection), rounded, then alternating projection (keep the
    coordinates whose projection is nearer the input than 0). Two matmuls per step for all
    rows; the truth reaches its own mask (residual ~1e-7) or comes close, a false one stays far.
    `costs` (n x width, default 1) weigh each dropped coordinate: random ones pick different
    masks of an input that several tokens share.
    """
    u = inputs
    rho = 1 / u.square().mean(-1, keepdim=True)
    inverse = (1 if costs is None else costs) / (rho * u.square().clamp_min(1e-30))
    safe = torch.where(u.abs() > 1e-15, u, torch.full_like(u, 1e-15))
    z = project(u)
    w = torch.zeros_like(u)
    y = w
    for _ in range(ADMM_STEPS):
        y = ((u - z + w) / safe - inverse).clamp(0, 1)
        x = u * (1 - y)
        z = project(x + w)
        w = w + x - z
    kept = y < 0.5
    for _ in range(POLISH_STEPS):
        x = project(u * kept)
        new = (x - u).abs() < x.abs()
        if bool((new == kept).all()):
            break
        kept = new
    return MaskFit(masked_residual(u, kept, project, most), kept)


def decode_masks(
    inputs: torch.Tensor,
    basis: torch.Tensor,
    most: int,
    anchor: torch.Tensor | None = None,
    costs: torch.Tensor | None = None,
) -> MaskFit:
    """Each row's mask (and, with `anchor`, the anchor's) by sparse-error decoding.

    A true row `u` (scaled by 1 / (1 - p)) differs from a vector of the span `W` in few
    coordinates: its dropped ones (error `u_i`). For a key module `W` is the span plus the
    unmasked anchor `a` (the first token's input): the row minus its sentence's masked anchor is
    in the span, so the error is also `-a_i` where the anchor was dropped, `u_i - a_i` where
    both were. ADMM on `min sum(costs * |e|)` with `u - e` in `W` (soft thresholding and a
    projection, batched), then each coordinate's error snapped to the nearest of those values;
    the residual is that of the masked row (minus the masked anchor) against the span.
    """
    span = basis if anchor is None else torch.linalg.qr(torch.cat([basis, anchor[None]]).T).Q.T
    u = inputs
    weight = u.abs().mean(-1, keepdim=True) * (1 if costs is None else costs)
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
        return MaskFit(masked_residual(u, kept, span_projection(basis), most), kept)
    a = anchor.expand_as(u)
    state = (e[None] - torch.stack([zero, u, -a, u - a])).abs().argmin(0)
    kept, anchor_kept = (state == 0) | (state == 2), (state == 0) | (state == 1)
    x = u * kept - a * anchor_kept
    residual = (x - (x @ basis.T) @ basis).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-300)
    too_many = ((~kept).sum(-1) > most) | ((~anchor_kept).sum(-1) > most)
    return MaskFit(residual.masked_fill(too_many, float("inf")), kept, anchor_kept)


def complement(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (k x width) of the row space's orthogonal complement."""
    return torch.linalg.svd(basis, full_matrices=True).Vh[basis.shape[0] :]


def _constraint(row: torch.Tensor, orthogonal: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """`N^T diag(u)` and `N^T u` of the programmes, in float64 numpy."""
    u = row.double().cpu().numpy()
    a = orthogonal.double().cpu().numpy() * u
    return a, a.sum(1)


def lp_mask(row: torch.Tensor, orthogonal: torch.Tensor) -> float:
    """The box relaxation's optimum for one candidate `row` (width, scaled by 1 / (1 - p)):
    the fewest dropped coordinates `sum(y)` with `N^T diag(row) (1 - y) = 0` (within rounding)
    and `0 <= y <= 1`, `N` the complement's basis; inf when infeasible. The truth needs about
    p x width, a false candidate far more."""
    a, b = _constraint(row, orthogonal)
    slack = TOLERANCE * float(row.double().norm())
    res = linprog(
        np.ones(a.shape[1]),
        A_ub=np.vstack([a, -a]),
        b_ub=np.concatenate([b + slack, slack - b]),
        bounds=(0, 1),
        method="highs",
    )
    return float(res.x.sum()) if res.status == 0 else float("inf")


def exact_masks(
    rows: torch.Tensor,
    orthogonal: torch.Tensor,
    most: int,
    exclude: tuple[torch.Tensor, ...] = (),
    time_limit: float = 10.0,
) -> torch.Tensor | None:
    """The 0/1 masks (k x width, 1 kept) with the fewest drops, at most `most` each, that put
    `sum_i (-1)^i rows[i] * masks[i]` in the span (within rounding), the first mask other than
    those in `exclude`; None if there are none (or none found within `time_limit` seconds).
    One row: is this input in the span; two: is their difference (too slow to be used: 10-60 s
    and more for a key module's first and last token). A MILP: the box relaxation (`lp_mask`)
    is fractional when the span is wide (B >= 8) or when two tokens share the input."""
    k, width = rows.shape
    parts = [_constraint(row * (-1) ** i, orthogonal) for i, row in enumerate(rows)]
    a = np.hstack([p[0] for p in parts])
    b = sum(p[1] for p in parts)
    slack = TOLERANCE * float(rows.double().norm())
    constraints = [LinearConstraint(a, b - slack, b + slack)]
    for i in range(k):
        block = np.zeros(k * width)
        block[i * width : (i + 1) * width] = 1
        constraints.append(LinearConstraint(block, 0, most))
    for kept in exclude:  # at least one of its dropped coordinates kept
        dropped = np.zeros(k * width)
        dropped[:width] = (~kept).cpu().numpy()
        constraints.append(LinearConstraint(dropped, -np.inf, dropped.sum() - 1))
    res = milp(
        np.ones(k * width),
        constraints=constraints,
        integrality=np.ones(k * width),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit},
    )
    if res.status != 0 or res.x is None:
        return None
    return torch.from_numpy(res.x.reshape(k, width) < 0.5).to(rows.device)
