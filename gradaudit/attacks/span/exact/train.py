"""Exact mode on a train-mode gradient: every token's own dropped-out input, then its sentence.

With embedding dropout every token occurrence has its own input `m * u / (1 - p)`, so the rows
are distinct and each is found in the span with its mask (`dropout.find_rows`). One
least-squares solve then gives every token's backward signal, and for query and key modules
the membership test (signals in their own sentence's partners' span) sorts the tokens into
sentences. The check re-draws nothing: the found inputs must explain the gradient to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import candidate_token_ids, content_mask
from gradaudit.attacks.span.exact.dropout import FoundRows, find_rows
from gradaudit.attacks.span.exact.masks import (
    MASK_EXACT,
    complement,
    exact_masks,
    fit_masks,
    most_dropped,
    pair_projection,
)
from gradaudit.attacks.span.exact.membership import Membership, Signals, assign
from gradaudit.attacks.span.exact.screening import (
    Slot,
    content_slots,
    extend_basis,
    layer0_inputs,
    screen_tokens,
    slot_offsets,
)
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.gradients.spectrum import Spectrum
from gradaudit.model.families import ModelLayout

EXPLAINED = 1e-4  # relative residual of G = D^T X for inputs that explain the gradient (~1e-7)
SCREEN_PER_SENTENCE = 24  # prefilter: tokens kept per slot and sentence sharing it (min 64)
RESTARTS = 4  # annealing runs from shuffled starts, while none is exact


@dataclass
class RowMembership(Membership):
    """The membership test over found input rows: `ids` hold row indices, not token ids."""

    rows: torch.Tensor | None = None  # n x width, the found inputs
    row_signals: torch.Tensor | None = None  # n x out, their backward signals

    def signals(self, ids: torch.Tensor) -> Signals:
        mask = self.batch["attention_mask"].bool()
        index = ids[mask]
        inputs, signals = self.rows[index], self.row_signals[index]
        partners = inputs @ self.weight.T + (self.bias if self.component == "key" else 0)
        split = lambda m: m.reshape(len(m), self.heads, -1).transpose(0, 1)  # noqa: E731
        order = torch.arange(len(index)).split(mask.sum(1).tolist())
        n = len(index)
        return Signals(
            split(signals), split(partners), [o.tolist() for o in order], [False] * n, [False] * n
        )


def slot_candidates(
    lay: ModelLayout,
    basis: torch.Tensor,
    slots: list[Slot],
    offsets: torch.Tensor,
    ids: torch.Tensor,
    content: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    chunk: int,
) -> list[torch.Tensor]:
    """Per slot: the known special tokens there, then (where text sits) the vocabulary's best
    by the plain residual (not a ranking under dropout: the truth ranks up to ~70th at B = 8)."""
    keep = max(64, SCREEN_PER_SENTENCE * max(len(s.sentences) for s in slots))
    texty = [j for j, s in enumerate(slots) if any(content[b, s.column] for b in s.sentences)]
    screened = screen_tokens(
        lay, basis, offsets[texty], candidate_token_ids(tokenizer), keep=keep, chunk=chunk
    )
    out = []
    for j, slot in enumerate(slots):
        known = {int(ids[b, slot.column]) for b in slot.sentences if not content[b, slot.column]}
        found = [screened[texty.index(j)].tolist()] if j in texty else []
        out.append(torch.tensor(sorted(known) + [v for f in found for v in f if v not in known]))
    return out


def key_anchors(
    lay: ModelLayout,
    basis: torch.Tensor,
    batch: dict[str, torch.Tensor],
    rate: float,
) -> torch.Tensor:
    """Each sentence's first-token input (masked), found from its pair with the sentence's last
    token: a key gradient spans only differences of a sentence's inputs (its signals sum to
    zero), and their difference is in it. Rows of the found first tokens (B x width)."""
    mask = batch["attention_mask"]
    width = basis.shape[1]
    last = mask.sum(1) - 1
    columns = torch.stack([torch.zeros_like(last), last], 1)  # first and last token
    tokens = batch["input_ids"].gather(1, columns)
    positions = lay.position_ids(mask).gather(1, columns)
    offsets = lay.position_embeddings.weight.detach()[positions]
    offsets = (
        offsets
        + lay.token_type_embeddings.weight.detach()[batch["token_type_ids"].gather(1, columns)]
    )
    rows = layer0_inputs(lay, tokens.flatten(), offsets.flatten(0, 1).to(torch.float64))
    rows = (rows / (1 - rate)).reshape(len(tokens), 2 * width)
    most = most_dropped(width, rate)
    fit = fit_masks(rows, pair_projection(basis), 2 * most)
    found: list[torch.Tensor] = []
    orthogonal = complement(basis)
    for b in fit.residual.argsort().tolist():
        kept = fit.kept[b, :width]
        if not fit.residual[b] < MASK_EXACT or any(bool((kept == f).all()) for f in found):
            masks = exact_masks(rows[b].reshape(2, width), orthogonal, most, tuple(found), 60.0)
            if masks is None:
                continue
            kept = masks[0]
        found.append(kept)
    first = rows[:, :width]
    return torch.stack([first[0] * k for k in found]) if found else basis.new_zeros(0, width)


def solve_train(
    model: nn.Module,
    snapshot: GradientSnapshot,
    lay: ModelLayout,
    module: str,
    spec: Spectrum,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    chunk: int,
    rate: float,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The batch's ids from `module`'s train-mode gradient with embedding dropout `rate`, and
    the details the result reports (how many inputs were found, how well they explain G)."""
    device = spec.basis.device
    batch = {k: v.to(device) for k, v in snapshot.batch.items()}
    content = content_mask(snapshot, tokenizer).to(device)
    slots = content_slots(batch, batch["attention_mask"].bool(), lay)
    offsets = slot_offsets(lay, slots, device)
    basis = spec.basis.to(torch.float64)
    component = lay.locate(module)[0]
    anchors = basis.new_zeros(0, basis.shape[1])
    if component == "key":
        anchors = key_anchors(lay, basis, batch, rate)
        basis = extend_basis(basis, anchors, tol=1e-6)
    candidates = slot_candidates(
        lay, basis, slots, offsets, batch["input_ids"], content, tokenizer, chunk
    )
    counts = [len(s.sentences) for s in slots]
    if len(anchors):  # the first tokens are found: slot 0 holds them, nothing else
        first = [j for j, s in enumerate(slots) if s.column == 0]
        for j in first:
            counts[j] = 0
    found = find_rows(lay, basis, offsets, candidates, counts, rate, complement(basis))
    for row in anchors:
        j = next(j for j, s in enumerate(slots) if s.column == 0)
        found.tokens.append(int(candidates[j][0]))
        found.slots.append(j)
        found.inputs.append(row)
    target = snapshot.weight_gradient(module).to(device, torch.float64)
    rows = found.stack()
    details: dict[str, Any] = {
        "dropout_rate": rate,
        "inputs_found": len(found.tokens),
        "inputs_expected": int(batch["attention_mask"].sum()),
    }
    if not len(found.tokens):
        details["explained_residual"] = 1.0
        return ids, details
    signals = torch.linalg.lstsq(rows.T, target.T, driver="gelsd").solution
    fit = float((target - signals.T @ rows).norm() / target.norm())
    details["explained_residual"] = fit
    ids, assignment = place_rows(
        model, module, batch, target, slots, found, rows, signals, ids, content
    )
    details.update(assignment)
    return ids.cpu(), details


def token_groups(
    slots: list[Slot], found: FoundRows, ids: torch.Tensor, content: torch.Tensor
) -> tuple[list[Slot], list[torch.Tensor]]:
    """The slots split by what their sentences hold: each known special token's sentences get
    that token's found rows, the sentences with text there the other rows (so the annealing
    never moves a [SEP] into text). Per group: its sentences and its pool of row indices."""
    groups, pools = [], []
    for j, slot in enumerate(slots):
        here = [i for i, s in enumerate(found.slots) if s == j]
        holders: dict[int, list[int]] = {}
        for b in slot.sentences:
            holders.setdefault(-1 if content[b, slot.column] else int(ids[b, slot.column]), [])
            holders[-1 if content[b, slot.column] else int(ids[b, slot.column])].append(b)
        for token, sentences in holders.items():
            pool = [i for i in here if (found.tokens[i] == token) == (token >= 0)]
            if token < 0:
                pool = [i for i in pool if found.tokens[i] not in holders]
            groups.append(Slot(slot.column, slot.position, slot.segment, tuple(sentences)))
            pools.append(torch.tensor(pool or [-1], dtype=torch.long))
    return groups, pools


def place_rows(
    model: nn.Module,
    module: str,
    batch: dict[str, torch.Tensor],
    target: torch.Tensor,
    slots: list[Slot],
    found: FoundRows,
    rows: torch.Tensor,
    signals: torch.Tensor,
    ids: torch.Tensor,
    content: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Each found input given to a sentence holding its slot: by the membership annealing
    for query and key modules (scored on the found inputs and their signals), else in the
    order found. Returns the token ids and how the assignment was decided."""
    slots, pools = token_groups(slots, found, ids.cpu(), content.cpu())
    index = torch.full_like(batch["input_ids"], -1).cpu()
    for slot, pool in zip(slots, pools):
        for i, b in enumerate(slot.sentences):
            index[b, slot.column] = pool[min(i, len(pool) - 1)]
    details: dict[str, Any] = {"assignment": "one sentence"}
    plain = Membership.build(model, model.get_submodule(module), batch, target)
    complete = all(len(p) >= len(s.sentences) and p[0] >= 0 for p, s in zip(pools, slots))
    if len(index) > 1 and plain is not None and complete:
        fields = {f: getattr(plain, f) for f in plain.__dataclass_fields__}
        membership = RowMembership(**fields, rows=rows, row_signals=signals)
        generator = torch.Generator().manual_seed(0)
        best = float("inf")
        for _ in range(RESTARTS):
            trial, score = assign(membership, index, slots, pools, generator)
            if score < best:
                best, index = score, trial
            if score < 1e-6:
                break
        index, best = polish(membership, index, slots, best)
        details.update(assignment="membership", membership_score=best)
    elif len(index) > 1:
        why = "no membership test for this module" if plain is None else "inputs missing"
        details["assignment"] = f"unverified ({why}): tokens sit at their positions"
    tokens = torch.tensor(found.tokens + [0])  # -1 (nothing found) reads as token 0 ([PAD])
    out = ids.clone().cpu()
    real = batch["attention_mask"].bool().cpu()
    out[real] = tokens[index[real]]
    return out, details


def polish(
    membership: RowMembership, index: torch.Tensor, slots: list[Slot], best: float
) -> tuple[torch.Tensor, float]:
    """Swap two sentences' rows at one slot, or at every slot they share from one on (the
    annealing can leave two sentences' beginnings exchanged), while that lowers the membership
    score."""
    improved = True
    while improved and best > 1e-6:
        improved = False
        for slot in slots:
            for x, b in enumerate(slot.sentences):
                for c in slot.sentences[x + 1 :]:
                    for columns in ([slot.column], tail(slots, slot.column, b, c)):
                        trial = index.clone()
                        trial[b, columns], trial[c, columns] = index[c, columns], index[b, columns]
                        own, _, shared = membership.score(membership.signals(trial))
                        if sum(own) + shared < best:
                            index, best, improved = trial, sum(own) + shared, True
    return index, best


def tail(slots: list[Slot], start: int, b: int, c: int) -> list[int]:
    """Columns from `start` on where sentences `b` and `c` are in one group (both text)."""
    return sorted({s.column for s in slots if s.column >= start and {b, c} <= set(s.sentences)})
