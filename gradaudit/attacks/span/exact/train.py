"""Exact mode on a train-mode gradient: every token's own dropped-out input, then its sentence.

With embedding dropout every token occurrence has its own input `m * u / (1 - p)`, so the rows
are distinct and each is found in the span with its mask (`dropout.find_rows`). One
least-squares solve then gives every token's backward signal, and for query and key modules
the membership test (signals in their own sentence's partners' span) sorts the tokens into
sentences, for value modules the signals' shared direction per sentence (`cohesion`); key
modules find and place their rows by first-token masks (`keys`). The check re-draws nothing:
the found inputs must explain the gradient to rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import candidate_token_ids, content_mask
from gradaudit.attacks.span.exact.cohesion import cohere
from gradaudit.attacks.span.exact.dropout import Finder, FoundRows, find_rows
from gradaudit.attacks.span.exact.keys import anchor_index, key_rows, sentence_ends
from gradaudit.attacks.span.exact.masks import most_dropped
from gradaudit.attacks.span.exact.membership import (
    MEMBERSHIP_EXACT,
    Membership,
    Signals,
    assign,
    search_alone,
)
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
# A sentence's membership score that is wrong where inputs are missing: their keys are missing
# from the spans (the truth 1e-4 to 3e-4 with 2 of 204 missing, Rotten Tomatoes test 8-15).
MEMBERSHIP_MISSING = 1e-3


@dataclass
class RowMembership(Membership):
    """The membership test over found input rows: `ids` hold row indices, not token ids."""

    rows: torch.Tensor | None = None  # n x width, the found inputs
    row_signals: torch.Tensor | None = None  # n x out, their backward signals

    def signals(self, ids: torch.Tensor) -> Signals:
        """Each real token's own row (-1: not found, a stand-in that is neither tested nor a
        partner)."""
        mask = self.batch["attention_mask"].bool()
        index = ids[mask]
        inputs, signals = self.rows[index], self.row_signals[index]
        order = [o.tolist() for o in torch.arange(len(index)).split(mask.sum(1).tolist())]
        n = len(index)
        missing = frozenset((index < 0).nonzero().flatten().tolist())
        return Signals(
            self.per_head(signals), *self.projections(inputs), order, [False] * n, [False] * n,
            missing,
        )  # fmt: skip


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
    counts = [len(s.sentences) for s in slots]
    first = next(j for j, s in enumerate(slots) if s.column == 0)
    anchor, screen_basis = None, basis
    if lay.locate(module)[0] == "key":  # the first tokens' inputs come with every other row
        cls = batch["input_ids"][slots[first].sentences[0], 0]
        anchor = layer0_inputs(lay, cls[None], offsets[first][None])[0] / (1 - rate)
        counts[first], screen_basis = 0, extend_basis(basis, anchor[None])
    candidates = slot_candidates(
        lay, screen_basis, slots, offsets, batch["input_ids"], content, tokenizer, chunk
    )
    finder = Finder(basis, most_dropped(basis.shape[1], rate), anchor)
    ends = sentence_ends(batch, content, slots)
    if anchor is None:
        found = find_rows(lay, finder, offsets, candidates, counts, rate)
    else:
        sentences = len(batch["input_ids"])
        found = key_rows(lay, finder, offsets, candidates, counts, rate, first, ends, sentences)
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
        model, lay, module, batch, target, slots, found, rows, signals, ids, content, ends
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
            pool += [-1] * (len(sentences) - len(pool))  # places without a found input
            pools.append(torch.tensor(pool, dtype=torch.long))
    return groups, pools


def place_rows(
    model: nn.Module,
    lay: ModelLayout,
    module: str,
    batch: dict[str, torch.Tensor],
    target: torch.Tensor,
    slots: list[Slot],
    found: FoundRows,
    rows: torch.Tensor,
    signals: torch.Tensor,
    ids: torch.Tensor,
    content: torch.Tensor,
    ends: dict[int, int],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Each found input given to a sentence holding its slot: by the first-token masks or the
    membership annealing for key and query modules (scored on the found inputs and their
    signals), by the signals' cohesion for value modules, else in the order found. Returns the
    token ids and how the assignment was decided. `ends`: slot -> the [SEP] ending a sentence
    there (`keys.sentence_ends`)."""
    by_anchor = anchor_index(found, batch["attention_mask"].cpu(), slots, ends)
    slots, pools = token_groups(slots, found, ids.cpu(), content.cpu())
    index = torch.full_like(batch["input_ids"], -1).cpu()
    for slot, pool in zip(slots, pools):
        for i, b in enumerate(slot.sentences):
            index[b, slot.column] = pool[i]
    details: dict[str, Any] = {"assignment": "one sentence"}
    plain = Membership.build(model, model.get_submodule(module), batch, target)
    missing = sum(int((p < 0).sum()) for p in pools)
    if len(index) > 1 and by_anchor is not None:
        index, note = by_anchor
        details["assignment"] = "first-token masks" + note
    if len(index) > 1 and plain is not None:
        fields = {f: getattr(plain, f) for f in plain.__dataclass_fields__}
        membership = RowMembership(**fields, rows=rows, row_signals=signals)
        if by_anchor is None:
            index, alone = anneal(membership, index, slots, pools)
            details.update(assignment="membership", sentences_solved_alone=alone)
        own, _, shared = membership.score(membership.signals(index))
        details["membership_score"] = sum(own) + shared
        windowed = membership.windowed()
        if by_anchor is None and len(windowed) > 1:
            details["assignment"] += (
                f" (windowed between sentences {windowed}, longer than a head: a ranking, not "
                "exact)"
            )
    elif len(index) > 1 and by_anchor is None and lay.locate(module)[0] == "value":
        index, margin = cohere(index, slots, pools, signals)
        details.update(assignment="signal cohesion", cohesion_margin=margin)
    elif len(index) > 1 and by_anchor is None:
        details["assignment"] = "unverified (no membership test): tokens sit at their positions"
    if len(index) > 1 and missing and by_anchor is None:  # `anchor_index` notes its own
        details["assignment"] += f" ({missing} inputs missing: their places are left empty)"
    tokens = torch.tensor(found.tokens + [0])  # -1 (nothing found) reads as token 0 ([PAD])
    out = ids.clone().cpu()
    real = batch["attention_mask"].bool().cpu()
    out[real] = tokens[index[real]]
    return out, details


def anneal(
    membership: RowMembership, index: torch.Tensor, slots: list[Slot], pools: list[torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Sentences no longer than a head searched alone first (`solve_alone`); the rest by the
    membership annealing from shuffled starts; then the greedy polish of all; then sentences
    longer than a head (to which every signal belongs) are polished among themselves by the
    windowed test (greedily: as exact as annealing on the batches measured, 4x faster), with
    the sentences the plain test still finds wrong (the long ones took their tokens, which
    they score 0 with; where inputs are missing, the truth's own scores are ~1e-4 to 1e-2,
    not 0). Returns the index and how many sentences were solved alone."""
    generator = torch.Generator().manual_seed(0)
    wrong = MEMBERSHIP_MISSING if any(bool((p < 0).any()) for p in pools) else MEMBERSHIP_EXACT
    index, solved = solve_alone(membership, index, slots, wrong, generator)
    rest = [
        dataclasses.replace(s, sentences=tuple(b for b in s.sentences if b not in solved))
        for s in slots
    ]
    pools = [index[list(s.sentences), s.column] for s in rest]  # the rows left to them
    best = float("inf")
    for _ in range(RESTARTS):
        trial, score = assign(membership, index, rest, pools, generator)
        if score < best:
            best, index = score, trial
        if score < 1e-6:
            break
    slots = [s for s in slots if len(s.sentences) > 1]
    index = polish(membership, index, slots, best)[0]
    long = set(membership.windowed())
    if len(long) < 2:
        return index, len(solved)
    own = membership.score(membership.signals(index))[0]  # a long sentence's own is always ~0
    long |= {b for b, score in enumerate(own) if score > wrong}
    windowed = dataclasses.replace(membership, window=True)
    among = [
        dataclasses.replace(s, sentences=tuple(b for b in s.sentences if b in long)) for s in slots
    ]
    own, _, shared = windowed.score(windowed.signals(index))
    among = [s for s in among if len(s.sentences) > 1]
    return polish(windowed, index, among, sum(own) + shared)[0], len(solved)


def solve_alone(
    membership: RowMembership,
    index: torch.Tensor,
    slots: list[Slot],
    exact: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, set[int]]:
    """Each sentence no longer than a head searched by itself among its slots' rows
    (`search_alone`; missing rows' stand-ins left out: any sentence would rather hold one
    than a wrong row). The searches scoring below `exact` claim their rows, best first; one
    that finds rows claimed already (sentences of one length are alike to the search: two
    can find the same one), or nothing below `exact`, is searched again without them.
    Returns the index with the claims placed (the slots' other rows left to the other
    sentences, in order) and the sentences that claimed."""
    state = membership.signals(index)
    mask = membership.batch["attention_mask"].cpu()
    start = (mask.sum(1).cumsum(0) - mask.sum(1)).tolist()
    place = (mask.cumsum(1) - 1).tolist()
    position = {(b, s.column): start[b] + place[b][s.column] for s in slots for b in s.sentences}
    group = {(b, s.column): s for s in slots for b in s.sentences}
    long = set(membership.windowed())

    def search(b: int, taken: set[int]) -> tuple[dict[int, int], float]:
        columns = sorted(c for (x, c) in group if x == b)
        options = [[position[x, c] for x in group[b, c].sentences] for c in columns]
        options = [[r for r in o if r not in state.missing and r not in taken] for o in options]
        if not all(options):
            return {}, float("inf")
        rows, score = search_alone(membership, state, options, exact, generator)
        return dict(zip(columns, rows)), score

    found = {b: search(b, set()) for b in range(len(index)) if b not in long}
    claims: dict[int, dict[int, int]] = {}
    taken: set[int] = set()
    for b in sorted(found, key=lambda b: found[b][1]):
        rows, score = found[b]
        if taken & set(rows.values()) or (score >= exact and taken):
            rows, score = search(b, taken)
        if score < exact:
            claims[b] = rows
            taken |= set(rows.values())
    flat = index[mask.bool()]
    out = index.clone()
    for slot in slots:
        left = [position[b, slot.column] for b in slot.sentences]
        left = [r for r in left if r not in taken]
        for b in slot.sentences:
            out[b, slot.column] = flat[claims[b][slot.column] if b in claims else left.pop(0)]
    return out, set(claims)


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
