"""Exact mode's screening: every vocabulary token tested at every slot of a layer-0 batch.

The input of layer-0 query/key/value in an absolute-position encoder is a per-token function
of (token, position, segment), `x = LayerNorm(E[v] + P[t] + T[s])`, and the rows of the
weight gradient span exactly the batch's inputs. So each candidate token is scored at each
occupied slot by its normalised residual against that row space, and a slot shared by `n`
sentences keeps the tokens before the largest jump in the sorted residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradaudit.model.families import ModelLayout
from gradaudit.model.lora import split_part

EXACT_COMPONENTS = ("query", "key", "value")


@dataclass(frozen=True)
class Slot:
    """One column of the padded batch with its position/segment id and who occupies it."""

    column: int
    position: int
    segment: int
    sentences: tuple[int, ...]


def exact_applicable(lay: ModelLayout, module: str) -> bool:
    """True for layer-0 query/key/value of an absolute-position encoder, or their LoRA lora_A
    (whose inputs are theirs; lora_B's are `A x`, which deep mode handles)."""
    where = lay.locate(module)
    absolute = getattr(lay.model.config, "position_embedding_type", "absolute") == "absolute"
    per_token = where is not None and where[1] == 0 and where[0] in EXACT_COMPONENTS
    return absolute and per_token and split_part(module)[1] != "lora_B"


def content_slots(
    batch: dict[str, torch.Tensor], content: torch.Tensor, lay: ModelLayout
) -> list[Slot]:
    """The slots holding text to recover, grouped by (column, position id, segment)."""
    positions = lay.position_ids(batch["attention_mask"])
    groups: dict[tuple[int, int, int], list[int]] = {}
    for b, column in content.nonzero().tolist():
        key = (column, int(positions[b, column]), int(batch["token_type_ids"][b, column]))
        groups.setdefault(key, []).append(b)
    return [Slot(c, p, s, tuple(bs)) for (c, p, s), bs in sorted(groups.items())]


def norm_affine(lay: ModelLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding LayerNorm's weight and bias (gamma, beta) in float64 on `device`."""
    norm = lay.embedding_norm
    return (
        norm.weight.detach().to(device, torch.float64),
        norm.bias.detach().to(device, torch.float64),
    )


def slot_offsets(lay: ModelLayout, slots: list[Slot], device: torch.device) -> torch.Tensor:
    """Position + segment embedding of each slot (float64, slots x width)."""
    pos = torch.tensor([s.position for s in slots], dtype=torch.long, device=device)
    seg = torch.tensor([s.segment for s in slots], dtype=torch.long, device=device)
    pos_table = lay.position_embeddings.weight.detach()
    seg_table = lay.token_type_embeddings.weight.detach()
    return (pos_table[pos] + seg_table[seg]).to(torch.float64)


def layer0_inputs(lay: ModelLayout, token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Exact float64 layer-0 inputs of `token_ids` (n) at slots with `offsets` (n x width)."""
    gamma, beta = norm_affine(lay, offsets.device)
    words = lay.word_embeddings.weight.detach()[token_ids].to(torch.float64)
    z = words + offsets
    z = z - z.mean(-1, keepdim=True)
    eps = lay.embedding_norm.eps
    return gamma * z / torch.sqrt(z.square().mean(-1, keepdim=True) + eps) + beta


def token_offsets(
    lay: ModelLayout, batch: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Position + segment embedding (float64) of the batch's tokens where `mask` is true."""
    positions = lay.position_ids(batch["attention_mask"])[mask].to(device)
    offsets = lay.position_embeddings.weight.detach()[positions]
    offsets = offsets + lay.token_type_embeddings.weight.detach()[batch["token_type_ids"][mask]]
    return offsets.to(torch.float64)


def known_inputs(
    lay: ModelLayout, batch: dict[str, torch.Tensor], mask: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Exact layer-0 inputs of the batch's tokens where `mask` is true (e.g. special tokens)."""
    offsets = token_offsets(lay, batch, mask, device)
    return layer0_inputs(lay, batch["input_ids"][mask].to(device), offsets)


def extend_basis(basis: torch.Tensor, inputs: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Orthonormal basis of span(basis) plus the `inputs` rows that lie outside it.

    A key gradient holds only differences of inputs (softmax ignores a shift shared by a
    sentence's keys, so each sentence's key signals sum to zero); adding the known [CLS]
    input restores the inputs' own span. Rows already inside (query, value) add nothing.
    """
    outside = inputs[residuals(inputs, basis) > tol]
    if not len(outside):
        return basis
    return torch.linalg.qr(torch.cat([basis, outside]).T).Q.T


def screen_tokens(
    lay: ModelLayout,
    basis: torch.Tensor,
    offsets: torch.Tensor,
    candidates: torch.Tensor,
    *,
    keep: int,
    chunk: int,
) -> torch.Tensor:
    """The `keep` candidates per slot with the smallest residual (slots x keep token ids).

    Inner products only: for x = gamma*z/sigma + beta and a basis W,
    |Wx|^2 = |W(gamma z)|^2/sigma^2 + 2 W(gamma z).W beta/sigma + |W beta|^2, each term a
    matmul between a vocabulary chunk and the slots. The smaller of the row basis and its
    complement is used.
    """
    device = basis.device
    width = basis.shape[1]
    gamma, beta = norm_affine(lay, device)
    eps = lay.embedding_norm.eps
    use_complement = basis.shape[0] > width // 2
    if use_complement:
        w = torch.linalg.svd(basis, full_matrices=True).Vh[basis.shape[0] :]
    else:
        w = basis
    w_g = w * gamma  # W diag(gamma)
    off = offsets - offsets.mean(-1, keepdim=True)  # slots x d, centred
    b = off @ w_g.T  # slots x k
    c = w @ beta  # k
    off_sq = off.square().sum(-1)
    off_gsq = (gamma * off).square().sum(-1)
    off_gb = off @ (gamma * beta)
    b_sq = b.square().sum(-1)
    b_c = b @ c
    table = lay.word_embeddings.weight.detach()
    best_res = torch.zeros((len(offsets), 0), dtype=torch.float64, device=device)
    best_ids = torch.zeros((len(offsets), 0), dtype=torch.long, device=device)
    for start in range(0, len(candidates), chunk):
        ids = candidates[start : start + chunk].to(device)
        e = table[ids].to(torch.float64)
        e = e - e.mean(-1, keepdim=True)
        a = e @ w_g.T  # chunk x k
        z_sq = e.square().sum(-1, keepdim=True) + 2 * e @ off.T + off_sq  # chunk x slots
        sigma = torch.sqrt(z_sq / width + eps)
        gz_sq = (gamma * e).square().sum(-1, keepdim=True) + 2 * (gamma.square() * e) @ off.T
        gz_sq = gz_sq + off_gsq
        gzb = (e @ (gamma * beta)).unsqueeze(-1) + off_gb
        x_sq = gz_sq / sigma.square() + 2 * gzb / sigma + beta.square().sum()
        wz_sq = a.square().sum(-1, keepdim=True) + 2 * a @ b.T + b_sq
        wzc = (a @ c).unsqueeze(-1) + b_c
        wx_sq = wz_sq / sigma.square() + 2 * wzc / sigma + c.square().sum()
        res = wx_sq if use_complement else x_sq - wx_sq
        res = (res.clamp_min(0) / x_sq).T  # slots x chunk
        best_res = torch.cat([best_res, res], 1)
        best_ids = torch.cat([best_ids, ids.expand(len(offsets), -1)], 1)
        top = best_res.topk(min(keep, best_res.shape[1]), dim=1, largest=False)
        best_res, best_ids = top.values, best_ids.gather(1, top.indices)
    return best_ids


def residuals(inputs: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Normalised residual of each row of `inputs` (..., width) against the row space."""
    projected = (inputs @ basis.T) @ basis
    return (inputs - projected).norm(dim=-1) / inputs.norm(dim=-1)


def pick_by_gap(res: torch.Tensor, count: int) -> int:
    """How many of the sorted residuals `res` are true: 1..count, at the largest jump."""
    if count <= 1 or res.numel() <= 1:
        return 1
    logs = res.clamp_min(1e-300).log()
    jumps = logs[1 : count + 1] - logs[:count]
    return int(jumps.argmax()) + 1
