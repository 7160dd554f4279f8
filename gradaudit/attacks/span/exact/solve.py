"""Exact mode: a layer-0 batch recovered from one query, key or value gradient.

Each slot is screened against the row space, the word split places the words met once, and the
search sorts the rest out. A batch left unsolved is peeled: the sentences whose gradient proves
exact come off the target and the others are solved again, since fewer sentences leave fewer
(word, position) pairs to confuse; one sentence left is decided by the row space alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import candidate_token_ids, content_mask
from gradaudit.attacks.span.exact.membership import DEPENDENT
from gradaudit.attacks.span.exact.screening import (
    Slot,
    content_slots,
    extend_basis,
    known_inputs,
    layer0_inputs,
    pick_by_gap,
    residuals,
    screen_tokens,
    slot_offsets,
    token_offsets,
)
from gradaudit.attacks.span.exact.search import EXACT_RESIDUAL, Search
from gradaudit.attacks.span.exact.words import WordPlaces, word_places
from gradaudit.attacks.span.options import SpanOptions
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.gradients.spectrum import Spectrum, spectrum
from gradaudit.model.families import ModelLayout


def solve_exact(
    model: nn.Module,
    snapshot: GradientSnapshot,
    lay: ModelLayout,
    module: str,
    spec: Spectrum,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    options: SpanOptions,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The batch's ids (B, L) from `module`'s gradient (spectrum `spec`), starting from `ids`
    (content unknown), and the details the result reports. While the batch is not solved, the
    sentences that the rank drop verifies are taken off the gradient and the others are solved
    again (kept only where that lowers their residual)."""
    device = spec.basis.device
    batch = {k: v.to(device) for k, v in snapshot.batch.items()}
    content = content_mask(snapshot, tokenizer).to(device)
    full = snapshot.weight_gradient(module).to(device)
    target, ids, left = full, ids.to(device), list(range(len(ids)))
    details: dict[str, Any] = {"peeled": []}
    before = math.inf  # relative residual of the current ids of `left` on their remainder
    while True:
        scale = len(ids) / len(left)  # the part's gradient as if it were the whole batch
        part = {k: v[left] for k, v in batch.items()}
        if len(left) < len(ids):
            noisy = snapshot.kind == "noised"
            spec = spectrum(target * scale, noisy=noisy, min_gap=options.min_gap, name=module)
            if spec.status != "ok":
                break
        search = Search(
            model, model.get_submodule(module), part, target * scale, options.forward_batch
        )
        found, residual, screening = solve_part(
            lay, search, spec, content[left], tokenizer, ids[left], options
        )
        if residual >= before:  # solving again did worse than the ids it started from
            details["gradient_residual"] = before * float(target.norm() / full.norm())
            break
        ids[left] = found
        if len(left) == len(ids):  # the whole batch's screening is the one reported
            details.update(screening)
        # What the batch's gradient leaves unexplained: the part's relative residual,
        # back at the whole batch's scale (the peeled gradients were taken off as computed).
        details["gradient_residual"] = residual * float(target.norm() / full.norm())
        if residual < EXACT_RESIDUAL or len(left) == 1:
            break
        grads = search.gradients(list(range(len(left))), found)
        verified = verified_sentences(grads, search.target, spec, content[left])
        if not verified or len(verified) == len(left):  # all verified: nothing to redo
            break
        details["peeled"].append([left[i] for i in verified])
        remainder = search.target - grads[verified].sum(0)
        others = [i for i in range(len(left)) if i not in verified]
        before = float((remainder - grads[others].sum(0)).norm() / remainder.norm())
        target = target - grads[verified].sum(0) / scale
        left = [b for i, b in enumerate(left) if i not in verified]
    return ids.cpu(), details


def solve_part(
    lay: ModelLayout,
    search: Search,
    spec: Spectrum,
    content: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    options: SpanOptions,
) -> tuple[torch.Tensor, float, dict[str, Any]]:
    """Screen every slot of `search`'s batch against the span, then sort the tokens out
    (`Search.run`); the ids, their relative gradient residual and the slots' margins.

    With several sentences the gradient is also split into word and slot parts (`word_places`):
    the words it places come first in their slots' pools and leave every other pool; a batch
    the search leaves unsolved is searched again over the split's pools for the words it did
    not place."""
    device = spec.basis.device
    batch = search.batch
    special = batch["attention_mask"].bool() & ~content
    basis = extend_basis(spec.basis, known_inputs(lay, batch, special, device))
    slots = content_slots(batch, content, lay)
    offsets = slot_offsets(lay, slots, device)
    candidates = candidate_token_ids(tokenizer)
    places = None
    if any(len(s.sentences) > 1 for s in slots):
        special_offsets = token_offsets(lay, batch, special, device)
        places = word_places(
            lay, search.target, basis, slots, batch["input_ids"][special], special_offsets,
            offsets, candidates, chunk=options.chunk,
        )  # fmt: skip
    keep = max(len(s.sentences) for s in slots) + options.pool_extra
    screened = screen_tokens(lay, basis, offsets, candidates, keep=keep, chunk=options.chunk)
    ids, pools, details = slot_pools(
        lay, basis, slots, offsets, screened, places, ids, options.progress
    )
    kept = [len(words) for words in places.placed] if places is not None else [0] * len(slots)
    found, residual = search.run(ids, slots, pools, options.sweeps, kept)
    if places is not None:
        details.update(words=len(places.words), placed_by_split=sum(kept))
        if residual >= EXACT_RESIDUAL:
            found, residual = search.descend(
                found, slots, places.pools(device), options.sweeps, kept
            )
    return found, residual, details


def slot_pools(
    lay: ModelLayout,
    basis: torch.Tensor,
    slots: list[Slot],
    offsets: torch.Tensor,
    screened: torch.Tensor,
    places: WordPlaces | None,
    ids: torch.Tensor,
    progress: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]]:
    """Each slot's pool of `screened` tokens, likeliest first, the ids with each of its
    sentences given a pool token, and the slots' residual margins.

    A slot shared by `n` sentences holds `k <= n` distinct tokens, `k` where the sorted
    residuals jump the most. With the word split (`places`), a slot's placed words lead its
    pool and no other pool offers them.
    """
    ids = ids.clone()
    sure = places.placed if places is not None else [[] for _ in slots]
    placed = {v for words in sure for v in words}
    pools, slot_res = [], []
    for j, slot in enumerate(tqdm(slots, desc="span slots", disable=not progress)):
        inputs = layer0_inputs(lay, screened[j], offsets[j].expand(len(screened[j]), -1))
        res, order = residuals(inputs, basis).sort()
        pool = screened[j][order]
        k = pick_by_gap(res, len(slot.sentences))
        slot_res.append((float(res[k - 1]), float(res[k]) if len(res) > k else float("inf")))
        if places is not None:
            # Never an empty pool: the split's ranking, else the row space's own.
            screened_ids = pool.tolist()
            rest = [v for v in screened_ids if v not in placed] or places.ranked[j]
            pool = torch.tensor(sure[j] + (rest or screened_ids), device=basis.device)
            k = min(len(pool), len(slot.sentences))
        pools.append(pool)
        for i, b in enumerate(slot.sentences):
            ids[b, slot.column] = pool[min(i, k - 1)]
    details: dict[str, Any] = {
        "slot_residual_max": max(r for r, _ in slot_res),
        "slot_margin_min": min(nxt / max(r, 1e-300) for r, nxt in slot_res),
        "searched_slots": sum(len(p) > 1 for p in pools),
    }
    return ids, pools, details


def verified_sentences(
    grads: torch.Tensor, target: torch.Tensor, spec: Spectrum, content: torch.Tensor
) -> list[int]:
    """Sentences whose hypothesised gradient is exact: taken off the batch's gradient, it
    lowers the rank by at least half the sentence's content tokens.

    `grads` (n x out x in) are the sentences' gradients, `spec` the spectrum of `target`.
    The truth removes the rows only its sentence holds, so the rank drops by about its token
    count; one wrong token changes every token's backward signal, the difference fills the span
    again, and the rank does not drop. Values count as gone below the geometric mean of the
    target's last kept and first dropped singular values.
    """
    values, rank = spec.singular_values.to(torch.float64), spec.rank
    last = values[rank - 1]
    cut = (last * values[rank]).sqrt() if rank < len(values) else last * DEPENDENT
    cut = cut.to(target.device)
    left = torch.stack([(torch.linalg.svdvals((target - g).double()) > cut).sum() for g in grads])
    needed = (content.sum(1) / 2).clamp_min(1)
    return (rank - left >= needed).nonzero().flatten().tolist()
