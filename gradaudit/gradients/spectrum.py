"""Numerical rank and row space of a weight gradient: the span its inputs must lie in.

For a linear module applied to every token, `G = sum_t delta_t x_t^T`, so the row space of
`G` lies in the span of the module's inputs and `rank(G) <= tokens`. The rank is read from
the singular values in float64:

1. a precision-aware floor, `eps(precision) * s_max`, below which a value is rounding. The
   precision is the one the gradient was computed in: its dtype, or, for a gradient stored
   as float32 but computed in bfloat16 or float16 (autocast, mixed precision), that narrower
   type, given or read from its values (all of them exactly representable in it);
2. the largest relative gap `s_k / s_{k+1}` above the floor: when it is at least `min_gap`,
   the rank is `k` (a clean spectrum, e.g. a raw float32 gradient);
3. later gaps of at least `min_gap` are recorded as `rank_above_rounding`: weaker directions
   that still stand clear of the rounding, which the largest gap leaves out (SST-2 dev
   sentences 0-3 at MiniLM's query@2: rank 71, 74 above rounding, the batch's token count;
   7 of 756 MiniLM gradients over three data sets and B = 1, 4, 8, none at B = 1). The attacks
   use `rank`: those directions are estimated with little precision (taken into the deep
   objective they lift the truth's score above its solved threshold);
4. without such a gap (noise, e.g. DP-SGD), the Gavish-Donoho hard threshold
   `omega(beta) * median(s)` separates the signal from the noise bulk, and the spectrum is
   flagged `clean=False`: attacks still run on the leading subspace, with looser residuals.
   A bfloat16 or float16 gradient without such a gap is `saturated`: its rounding (about 1e-3
   of the largest value) fills every direction, so its span constrains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradaudit.errors import GradAuditError

STATUSES = ("ok", "zero", "saturated")
LOW_PRECISIONS = (torch.bfloat16, torch.float16)  # coarsest first
# Values needed to tell a narrower precision from the stored one (a float32 value is exact in
# bfloat16 by chance with probability 2**-16).
_PRECISION_EVIDENCE = 16


@dataclass(frozen=True)
class Spectrum:
    """Singular values, numerical rank and orthonormal row-space basis of one weight gradient."""

    singular_values: torch.Tensor
    rank: int
    rank_above_rounding: int
    width: int  # the input width (columns)
    rows: int  # the output width: rank <= rows, e.g. a LoRA lora_A's r
    clean: bool
    gap: float
    floor: float
    basis: torch.Tensor
    status: str
    precision: str = "float32"

    def summary(self) -> dict[str, object]:
        """JSON-friendly record of how the rank was decided."""
        top = float(self.singular_values[0]) if self.singular_values.numel() else 0.0
        return {
            "rank": self.rank,
            "rank_above_rounding": self.rank_above_rounding,
            "width": self.width,
            "rows": self.rows,
            "status": self.status,
            "clean": self.clean,
            "gap": self.gap,
            "relative_floor": self.floor / top if top > 0 else 0.0,
            "precision": self.precision,
        }


def _gavish_donoho(s: torch.Tensor, shape: tuple[int, int]) -> int:
    beta = min(shape) / max(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return int((s > omega * s.median()).sum())


def gradient_precision(grad: torch.Tensor) -> torch.dtype:
    """The precision `grad` was computed in: the narrowest of bfloat16, float16 and float32
    (below its own dtype) that holds each of its (at least `_PRECISION_EVIDENCE` nonzero)
    values exactly, else its dtype. A float32 gradient stored as float64 has float32's
    rounding, which a float64 floor would take for signal."""
    if not grad.is_floating_point() or grad.dtype in LOW_PRECISIONS:
        return grad.dtype
    values = grad[grad != 0]
    if values.numel() < _PRECISION_EVIDENCE:
        return grad.dtype
    own = torch.finfo(grad.dtype).eps
    for dtype in (*LOW_PRECISIONS, torch.float32):
        coarser = torch.finfo(dtype).eps > own
        if coarser and torch.equal(values.to(dtype).to(grad.dtype), values):
            return dtype
    return grad.dtype


def _precision(grad: torch.Tensor, precision: torch.dtype | str | None) -> torch.dtype:
    """The coarser of `grad`'s dtype and `precision` (read from the values when None)."""
    if precision is None:
        return gradient_precision(grad)
    if isinstance(precision, str):
        named = getattr(torch, precision, None)
        if not isinstance(named, torch.dtype) or not named.is_floating_point:
            raise GradAuditError(f"precision {precision!r} is not a torch float type")
        precision = named
    return max(grad.dtype, precision, key=lambda t: torch.finfo(t).eps)


def spectrum(
    grad: torch.Tensor,
    *,
    noisy: bool = False,
    min_gap: float = 50.0,
    name: str = "gradient",
    precision: torch.dtype | str | None = None,
) -> Spectrum:
    """Rank and row space of `grad` (out x in); `noisy` for DP-noised gradients.

    `precision` is the float type the gradient was computed in (None: `gradient_precision`).
    Raises on NaN/inf, naming the module `name`.
    """
    if grad.dim() != 2:
        raise GradAuditError(f"{name}: expected a 2-d weight gradient, got {tuple(grad.shape)}")
    if not torch.isfinite(grad).all():
        raise GradAuditError(
            f"{name}: the gradient holds NaN or inf, so it has no usable span: fix the training "
            "step (loss scaling, learning rate) before auditing it"
        )
    rows, width = (int(n) for n in grad.shape)
    _, s, vh = torch.linalg.svd(grad.to(torch.float64), full_matrices=False)
    top = float(s[0])
    precision = _precision(grad, precision)
    kind = str(precision).removeprefix("torch.")
    floor = torch.finfo(precision).eps * top
    above = int((s > floor).sum())
    if above == 0:
        return Spectrum(s.cpu(), 0, 0, width, rows, True, 0.0, floor, vh[:0], "zero", kind)
    # Gap after each value above the floor. Past the last value of a full-row-rank gradient
    # (a LoRA lora_A with r < tokens) the rounding follows: without noise, that gap counts too,
    # so a strong leading direction is not mistaken for the rank's end.
    end = s[-1] if noisy else s.new_tensor(floor)
    following = torch.cat([s[1:], end.reshape(1)])[:above]
    ratios = s[:above] / following.clamp_min(floor * 1e-6)
    k = int(ratios.argmax())
    gap = float(ratios[k])
    clean = gap >= min_gap
    if clean:
        rank = k + 1
    elif noisy:
        rank = max(1, min(above, _gavish_donoho(s, tuple(grad.shape))))
    else:
        rank = above
    # Weaker directions past the rank's gap: interior gaps only (the gap to the rounding after
    # a full spectrum's last value may set the rank, not count a noise bulk above it).
    interior = ratios[: len(s) - 1]
    weaker = (interior >= min_gap).nonzero()
    clear = max(rank, int(weaker.max()) + 1 if len(weaker) else 0) if clean else rank
    rounded = precision in LOW_PRECISIONS and not (clean or noisy)  # no gap above rounding
    # Full row rank is information only in a clean gradient (see `label`'s `partial`); under
    # noise it cannot be told from the noise.
    full = rank >= width or noisy and rank >= rows
    status = "saturated" if full or rounded else "ok"
    return Spectrum(s.cpu(), rank, clear, width, rows, clean, gap, floor, vh[:rank], status, kind)


LABELS = ("exact", "span", "partial", "rank-limited", "saturated", "zero")


def label(spec: Spectrum, tokens: int, per_token_input: bool, bound: int | None = None) -> str:
    """What a module's gradient can leak (see LABELS).

    `partial`: the rank reaches `bound` (the most it can be whatever the tokens: the rows, or
    a LoRA lora_A's r) below the tokens, so the row space is a `bound`-dimensional slice of the
    inputs' span: the inputs must span it, but a single input need not lie in it.
    `rank-limited`: rank at most a quarter of the batch's tokens (e.g. only [CLS] reaches the
    loss through it); `exact`: a usable span over a per-token input (layer-0 query/key/value);
    `span`: a usable span past layer 0.
    """
    if spec.status != "ok":
        return spec.status
    bound = spec.rows if bound is None else bound
    if spec.rank >= bound and tokens > bound:
        return "partial"
    if spec.rank <= max(1, tokens // 4):
        return "rank-limited"
    return "exact" if per_token_input else "span"
