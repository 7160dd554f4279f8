"""Scores of candidates that change one sentence of a batch, the other sentences' share reused.

Candidates that differ from the current batch in one sentence share every other sentence's
module inputs, and so their part of both terms of the objective: an orthonormal basis of their
rows with its coverage of the observed span, and their rows' norms inside it and in all. Each
candidate adds its own sentence: its rows taken off that basis (twice, so the rest stays
orthogonal to rounding), a QR of those few rows, and their norms. At B = 8 that replaces each
candidate's QR of the whole batch's rows, which took four times its forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradaudit.attacks.span.deep.objective import SpanObjective


@dataclass
class Shared:
    """What the fixed sentences contribute at one module."""

    basis: torch.Tensor  # (d, n): orthonormal, spans their (centred) real rows
    covered: torch.Tensor  # |V basis|^2: how much of the span V they cover
    inside: torch.Tensor  # squared norm, inside V, of their rows `outside` tests
    norm: torch.Tensor  # squared norm of those rows


def other_rows(
    objective: SpanObjective, ids: torch.Tensor, sentence: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Module inputs (S, L, d) of every sentence of `ids` (B, L) but `sentence`, then of the
    sentences a view holds (`holding`), with their real and content masks (S, L)."""
    others = [c for c in range(len(ids)) if c != sentence]
    bases = objective.bases
    if others:
        seen = objective.module_inputs(objective.embed(ids[others]).unsqueeze(0), others)
        rows = {m: x[0].to(objective.precision) for m, x in seen.items()}
    else:  # one sentence: no rows but those held
        rows = {m: v.new_zeros((0, ids.shape[1], v.shape[1])) for m, v in bases.items()}
    if objective.fixed:
        rows = {m: torch.cat([x, objective.fixed[m].to(x)]) for m, x in rows.items()}
    real = torch.cat([objective.real[others], objective.fixed_real])
    return rows, real, torch.cat([objective.content[others], objective.fixed_content])


def shared_parts(
    objective: SpanObjective,
    seen: dict[str, torch.Tensor],
    real: torch.Tensor,
    content: torch.Tensor,
) -> dict[str, Shared]:
    """The share of fixed sentences with module inputs `seen` (S, L, d) and masks (S, L)."""
    parts = {}
    for name, basis in objective.bases.items():
        x = objective.centre(name, seen[name].to(objective.precision).unsqueeze(0), real)[0]
        q, _ = torch.linalg.qr(x[objective.spanning_rows(name, real)].T)  # (d, n)
        rows = x[objective.tested_rows(name, real, content)]
        parts[name] = Shared(
            q, (basis @ q).square().sum(), (rows @ basis.T).square().sum(), rows.square().sum()
        )
    return parts


def scores_with_shared(
    objective: SpanObjective,
    parts: dict[str, Shared],
    seen: dict[str, torch.Tensor],
    real: torch.Tensor,
    content: torch.Tensor,
) -> torch.Tensor:
    """Scores (K,) of K candidates of one sentence, module inputs `seen` (K, L, d) and masks
    (L,), each joined by the fixed sentences of `parts`."""
    total = 0
    for name, basis in objective.bases.items():
        share = parts[name]
        x = objective.centre(name, seen[name].to(objective.precision).unsqueeze(1), real[None])
        x = x[:, 0]
        own = x[:, objective.spanning_rows(name, real[None])[0]]  # (K, n_b, d)
        for _ in range(2):
            own = own - (own @ share.basis) @ share.basis.T
        q, _ = torch.linalg.qr(own.transpose(1, 2))  # (K, d, n_b)
        covered = share.covered + (basis @ q).square().sum((1, 2))
        total = total + 1 - covered.clamp(max=basis.shape[0]) / basis.shape[0]
        if objective.outside[name]:
            rows = x[:, objective.tested_rows(name, real[None], content[None])[0]]
            inside = share.inside + (rows @ basis.T).square().sum((1, 2))
            total = total + 1 - inside / (share.norm + rows.square().sum((1, 2)))
    return total
