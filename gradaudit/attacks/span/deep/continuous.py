"""Deep mode's continuous stage: Adam on word embeddings, and rounding to the nearest tokens.

The span objective is differentiable in the content positions' embeddings, so a search starts
continuous: Adam from random starts (all in one batch), then each position takes its nearest
token. A search that gets stuck restarts from starts drawn close around its tokens (a kick),
and a stuck slot can be optimised alone to rank the tokens near its own optimum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradaudit.attacks.span.deep.objective import DeepSettings, SpanObjective

KICK = 0.3  # spread of kicked restarts around their tokens, x the embeddings' spread
LR_SPREAD = 4.0  # step-size ratio between the last and the first continuous restart
REFINE_SHARE = 3  # a refining sweep's one-slot searches run steps / REFINE_SHARE Adam steps


def optimise_embeddings(
    objective: SpanObjective,
    settings: DeepSettings,
    generator: torch.Generator,
    around: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam from `restarts` random starts at once; the embeddings (K, B, L, H) and scores.

    The starts are spread over the vocabulary's embeddings, or, with `around` (token ids
    (B, L)), drawn `KICK` times as tightly around those tokens' embeddings."""
    emb = objective.embeddings
    shape = (settings.restarts, *objective.content.shape, emb.shape[1])
    start = torch.randn(shape, generator=generator, dtype=emb.dtype).to(emb.device)
    scale = objective.spread
    if around is None:
        origin = start * scale + emb.mean(0)
    else:
        origin = start * (KICK * scale) + objective.embed(around)
    # Restart steps spread geometrically from lr to LR_SPREAD * lr: the step size that
    # escapes poor starts differs between modules and sentences. Adam ignores the
    # gradient's scale, so optimising u in x = origin + lr_k * u at unit rate is Adam on x
    # at rate lr_k.
    spread = torch.arange(len(origin), dtype=torch.float64) / max(1, len(origin) - 1)
    rates = settings.lr * float(scale.mean()) * LR_SPREAD**spread
    rates = rates.to(origin).view(-1, *[1] * (origin.dim() - 1))
    u = torch.zeros_like(origin, requires_grad=True)
    optimizer = torch.optim.Adam([u], lr=1.0)
    for _ in range(settings.steps):
        if settings.expired():
            break
        loss = objective(origin + rates * u).sum()
        (u.grad,) = torch.autograd.grad(loss, [u])
        optimizer.step()
    x = (origin + rates * u).detach()
    with torch.no_grad():
        return x, objective(x)


def nearest(x: torch.Tensor, vocab: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Ids (P, k) of the k candidate tokens nearest by cosine to each row of `x` (P, H)."""
    sims = F.normalize(x, dim=-1) @ vocab.T
    return candidates[sims.topk(min(k, len(candidates)), dim=-1).indices]


def round_to_tokens(
    objective: SpanObjective,
    x: torch.Tensor,
    vocab: torch.Tensor,
    candidates: torch.Tensor,
    per_pass: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (K, B, L) nearest to continuous solutions `x` (K, B, L, H), and their scores."""
    mask = objective.content
    near = torch.stack([nearest(xk[mask], vocab, candidates, 1)[:, 0] for xk in x])
    starts = objective.known_ids.repeat(len(x), 1, 1)
    starts[:, mask] = near
    return starts, objective.score_ids(starts, per_pass)


def kicked_start(
    objective: SpanObjective,
    ids: torch.Tensor,
    vocab: torch.Tensor,
    candidates: torch.Tensor,
    settings: DeepSettings,
    per_pass: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A new start near a stuck result `ids` (B, L): its ids, score and continuous source,
    the best of continuous restarts drawn around `ids`' embeddings."""
    x, _ = optimise_embeddings(objective, settings, generator, around=ids)
    starts, scores = round_to_tokens(objective, x, vocab, candidates, per_pass)
    k = int(scores.argmin())
    return starts[k], scores[k], x[k]


def slot_optima(
    objective: SpanObjective,
    trials: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    settings: DeepSettings,
) -> torch.Tensor:
    """Embedding (K, H) at one free slot of each candidate batch `trials` (K, B, L) (slot
    `rows[k], columns[k]`) that minimises its score, all other tokens fixed: Adam from the
    slot's token, `forward_batch` sequences at a time. Its nearest tokens rank a missing word
    where first order does not."""
    rate = settings.lr * LR_SPREAD * float(objective.spread.mean())
    optima = []
    for part in torch.arange(len(trials), device=trials.device).split(
        max(1, settings.forward_batch // trials.shape[1])
    ):
        emb = objective.embed(trials[part])
        if settings.expired():  # out of time: the slots' own tokens
            optima.append(emb[torch.arange(len(part)), rows[part], columns[part]])
            continue
        k, at = torch.arange(len(part), device=part.device), (rows[part], columns[part])
        start = emb[(k, *at)]
        u = torch.zeros_like(start, requires_grad=True)
        optimizer = torch.optim.Adam([u], lr=rate)
        for _ in range(settings.steps // REFINE_SHARE):
            xs = emb.index_put((k, *at), start + u)
            (u.grad,) = torch.autograd.grad(objective(xs).sum(), [u])
            optimizer.step()
        optima.append((start + u).detach())
    return torch.cat(optima)
