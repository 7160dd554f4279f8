"""Which tokens' module inputs lie in the gradient's row space, after a cached prefix.

A first-order screen ranks the whole vocabulary with one matmul per prefix: the module input
is linearised in the new token's embedding at a centre `c`, `x(e) ~ x(c) + J (e - c)`, and
its part outside the row space, `P x`, is sketched by `k` directions `W` (random, or a basis
of the complement when that is no wider than `k`): `|W x(c) + (W J)(e - c)|` for every token
`e`, divided by the norm of the whole (that part and the one inside, `V x`): the relative
residual, which ranks tokens of large and small embeddings alike. `W J` and `V J` cost `k + r`
backward passes of one token, batched. The best `screen` tokens are then
checked exactly by their one-token forward pass (`residuals`).
"""

from __future__ import annotations

import torch

from gradaudit.attacks.causal.prefix import KV, PrefixRunner, concat


def complement_sketch(basis: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(k', width) directions whose norms of `W y` estimate `|y - V^T V y|` (float64): an
    orthonormal basis of the complement of the row space `basis` (r, width) when it has at most
    `k` dimensions, else `k` Gaussian directions projected onto it, scaled by 1/sqrt(k)."""
    r, width = basis.shape
    if width - r <= k:
        full = torch.linalg.svd(basis, full_matrices=True)[2] if r else None
        return (
            torch.eye(width, dtype=basis.dtype, device=basis.device) if full is None else full[r:]
        )
    gauss = torch.randn(k, width, generator=generator, dtype=basis.dtype).to(basis.device)
    return (gauss - (gauss @ basis.T) @ basis) / k**0.5


def relative_residual(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """|x - V^T V x| / |x| per row, in float64."""
    x = x.to(basis.dtype)
    outside = x - (x @ basis.T) @ basis
    return outside.norm(dim=-1) / x.norm(dim=-1).clamp_min(torch.finfo(basis.dtype).tiny)


class Screen:
    """First-order screen and exact check of next tokens after prefix rows of a cache."""

    def __init__(
        self,
        runner: PrefixRunner,
        basis: torch.Tensor,
        sketch: torch.Tensor,
        vocab: torch.Tensor,
        embeddings: torch.Tensor,
        forward_batch: int,
    ) -> None:
        self.runner = runner
        self.basis = basis
        self.sketch = sketch.to(embeddings.dtype)
        self.directions = torch.cat([self.sketch, basis.to(embeddings.dtype)])
        self.vocab = vocab  # candidate token ids (V,)
        self.embeddings = embeddings[vocab]  # their embeddings (V, H)
        self.forward_batch = forward_batch

    def rank(
        self,
        kv: KV,
        rows: torch.Tensor,
        position: int,
        centres: torch.Tensor,
        exclude: torch.Tensor,
        count: int,
        always: int = 0,
    ) -> torch.Tensor:
        """Indices into `vocab` (P, count + always): per prefix row, the `always` first tokens
        of the vocabulary (lowest ids: a BPE's most frequent merges, which first order ranks
        poorly) and the `count` the linearised input at `centres` (P, H) puts closest to the
        row space; `exclude` (P, V) left out."""
        k, outside = self.directions.shape[0], self.sketch.shape[0]
        per = max(1, self.forward_batch // k)
        out = []
        for start in range(0, int(rows.shape[0]), per):
            part = slice(start, start + per)
            n = int(rows[part].shape[0])
            e = centres[part].detach().repeat_interleave(k, 0).requires_grad_(True)
            with torch.enable_grad():
                x, _ = self.runner.run(kv, rows[part].repeat_interleave(k), position, embeds=e)
                z = (x.reshape(n, k, -1) * self.directions).sum(-1)  # (n, k)
                (grad,) = torch.autograd.grad(z.sum(), e)
            jac = grad.reshape(n, k, -1)  # W J per row
            shift = (centres[part].unsqueeze(1) * jac).sum(-1)  # (n, k): W J c
            pred = torch.einsum("vh,nkh->nvk", self.embeddings, jac)
            pred = pred + (z.detach() - shift).unsqueeze(1)
            out_part = pred[..., :outside].square().sum(-1)
            score = out_part / (out_part + pred[..., outside:].square().sum(-1))
            score[:, :always] = -1.0
            score = score.masked_fill(exclude[part], float("inf"))
            take = min(count + always, score.shape[1])
            out.append(score.topk(take, dim=1, largest=False).indices)
        return torch.cat(out)

    @torch.no_grad()
    def residuals(
        self, kv: KV, rows: torch.Tensor, position: int, ids: torch.Tensor
    ) -> torch.Tensor:
        """Exact relative residual (M,) of token `ids` (M,) after prefix rows `rows` (M,)."""
        out = []
        for start in range(0, int(rows.shape[0]), self.forward_batch):
            part = slice(start, start + self.forward_batch)
            x, _ = self.runner.run(kv, rows[part], position, ids=ids[part])
            out.append(relative_residual(x, self.basis))
        return torch.cat(out)

    @torch.no_grad()
    def extend(
        self, kv: KV, rows: torch.Tensor, position: int, ids: torch.Tensor
    ) -> tuple[torch.Tensor, KV]:
        """Module inputs (M, width) and grown caches of prefix rows `rows` + tokens `ids`."""
        xs, parts = [], []
        for start in range(0, int(rows.shape[0]), self.forward_batch):
            part = slice(start, start + self.forward_batch)
            x, grown = self.runner.run(kv, rows[part], position, ids=ids[part])
            xs.append(x)
            parts.append(grown)
        return torch.cat(xs), concat(parts)
