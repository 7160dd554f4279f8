"""Exact mode on a train-mode gradient: every token's own dropped-out input, then its sentence.

With embedding dropout every token occurrence has its own input `m * u / (1 - p)`, so the rows
are distinct and each is found in the span with its mask (`dropout.find_rows`). One
least-squares solve then gives every token's backward signal, and for query and key modules
the membership test (signals in their own sentence's partners' span) sorts the tokens into
sentences, for value modules the signals' shared direction per sentence (`cohesion`). The
check re-draws nothing: the found inputs must explain the gradient to rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import product
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import candidate_token_ids, content_mask
from gradaudit.attacks.span.exact.cohesion import cohere
from gradaudit.attacks.span.exact.dropout import Finder, FoundRows, find_rows
from gradaudit.attacks.span.exact.masks import (
    MASK_EXACT,
    most_dropped,
    off_span,
)
from gradaudit.attacks.span.exact.membership import MEMBERSHIP_EXACT, Membership, Signals, assign
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
# Key modules: candidates per slot searched first (the truth ranks up to ~70th at B = 8); the
# first pass need only find each sentence's first-token mask, the sentence pass tries all.
ANCHOR_PASS = 64
SAME_ANCHOR = 16  # coordinates two first-token masks differ in, at least, to be two
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
        order = [o.tolist() for o in torch.arange(len(index)).split(mask.sum(1).tolist())]
        n = len(index)
        return Signals(
            self.per_head(signals), *self.projections(inputs), order, [False] * n, [False] * n
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
    if anchor is None:
        found = find_rows(lay, finder, offsets, candidates, counts, rate)
    else:
        last = sentence_ends(batch, content, slots)
        sentences = len(batch["input_ids"])
        found = key_rows(lay, finder, offsets, candidates, counts, rate, first, last, sentences)
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
        model, lay, module, batch, target, slots, found, rows, signals, ids, content
    )
    details.update(assignment)
    return ids.cpu(), details


def key_rows(
    lay: ModelLayout,
    finder: Finder,
    offsets: torch.Tensor,
    candidates: list[torch.Tensor],
    counts: list[int],
    rate: float,
    first: int,
    last: dict[int, int],
    sentences: int,
) -> FoundRows:
    """A key module's inputs: a first pass over each slot's best candidates, for every
    sentence's first-token mask (again with the paired box relaxation where the decoding left
    sentences without one: a wide span), the first-token rows, the sentence pass; on a wide
    span once more for the sentences still without a mask (`new_sentences`)."""
    first_pass = [c[:ANCHOR_PASS] for c in candidates]
    found = find_rows(lay, finder, offsets, first_pass, counts, rate)
    groups = anchor_groups(found)
    if groups is None or len(groups[1]) < sentences:
        finder = dataclasses.replace(finder, paired_box=True)
        found = find_rows(lay, finder, offsets, first_pass, counts, rate)
    for again in (False, True):
        first_tokens(found, finder.anchor, finder.basis, first, int(candidates[first][0]))
        sentence_pass(lay, finder, found, finder.anchor, offsets, candidates, counts, rate, last)
        if again or not finder.paired_box:
            break
        if not new_sentences(lay, finder, found, offsets, candidates, counts, rate):
            break
    return found


def anchor_groups(found: FoundRows) -> tuple[list[int], list[torch.Tensor]] | None:
    """Which first-token mask each found row came with: masks that differ in fewer than
    `SAME_ANCHOR` coordinates are one (where the first token's input is near 0 a dropped
    coordinate hardly shows), each group's mask the per-coordinate majority. None without
    masks (query and value modules)."""
    if not found.anchors or any(m is None for m in found.anchors):
        return None
    members: list[list[torch.Tensor]] = []
    group = []
    for mask in found.anchors:
        near = [(m[0] != mask).sum() for m in members]
        at = int(torch.stack(near).argmin()) if near else -1
        if at < 0 or near[at] >= SAME_ANCHOR:
            members.append([])
            at = len(members) - 1
        members[at].append(mask)
        group.append(at)
    return group, [torch.stack(m).double().mean(0) > 0.5 for m in members]


def first_tokens(
    found: FoundRows, anchor: torch.Tensor, basis: torch.Tensor, slot: int, token: int
) -> None:
    """Add each sentence's first-token input to a key module's `found` rows, one per group of
    first-token masks the rows came with, each refined on its group's best-fitting row
    (`refine_anchor`); then every row is given the first token whose input, taken off it,
    leaves a vector of the span (~1e-7 for its own sentence's)."""
    groups = anchor_groups(found)
    if groups is None:
        return
    rows = found.stack()
    group, masks = torch.tensor(groups[0]), groups[1]
    for _ in range(2):
        off = first_token_residuals(rows, anchor, masks, basis)
        best = [
            int(off[:, g].masked_fill(group != g, float("inf")).argmin()) for g in range(len(masks))
        ]
        masks = [refine_anchor(rows[i], anchor, basis, m) for i, m in zip(best, masks)]
        group = first_token_residuals(rows, anchor, masks, basis).argmin(1)
    off = first_token_residuals(rows, anchor, masks, basis)
    keep = (off.min(1).values < MASK_EXACT).tolist()  # a false pair fits its own made-up mask
    found.anchors = [masks[int(g)] for g in off.argmin(1)]
    held = {int(g) for g, j, k in zip(off.argmin(1), found.slots, keep) if j == slot and k}
    for name in ("tokens", "slots", "inputs", "anchors"):
        setattr(found, name, [x for x, k in zip(getattr(found, name), keep) if k])
    for mask in (m for g, m in enumerate(masks) if g not in held):  # no first row yet
        found.tokens.append(token)
        found.slots.append(slot)
        found.inputs.append(anchor * mask)
        found.anchors.append(mask)


def first_token_residuals(
    rows: torch.Tensor, anchor: torch.Tensor, masks: list[torch.Tensor], basis: torch.Tensor
) -> torch.Tensor:
    """Relative residual (rows x masks) of each row minus each first-token input, off the span."""
    diff = rows[:, None] - torch.stack([anchor * m for m in masks])[None]
    return off_span(diff, basis)


def refine_anchor(
    row: torch.Tensor, anchor: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The first token's mask that makes `row` (of its sentence) minus its input lie in the
    span: alternating projection from `mask` (a group's majority: its coordinates where the
    input is near 0 are a guess)."""
    for _ in range(20):
        diff = row - anchor * mask
        z = row - (diff @ basis.T) @ basis  # the first token's input, as the span says
        new = (z - anchor).abs() < z.abs()
        if bool((new == mask).all()):
            break
        mask = new
    return mask


def new_sentences(
    lay: ModelLayout,
    finder: Finder,
    found: FoundRows,
    offsets: torch.Tensor,
    candidates: list[torch.Tensor],
    counts: list[int],
    rate: float,
) -> bool:
    """A key module's slots still lacking inputs searched among the candidates the first pass
    left (it took each slot's best `ANCHOR_PASS`), for rows of sentences no first-token mask
    yet holds; True when some were added (their sentences then get the sentence pass)."""
    missing = list(counts)
    for j in found.slots:
        missing[j] -= 1
    lacking = [j for j, n in enumerate(missing) if n > 0 and len(candidates[j]) > ANCHOR_PASS]
    groups = anchor_groups(found)
    if not lacking or groups is None:
        return False
    more = find_rows(  # each row's fit is its own: the first pass's candidates would fit alike
        lay,
        finder,
        offsets[lacking],
        [candidates[j][ANCHOR_PASS:] for j in lacking],
        [missing[j] for j in lacking],
        rate,
    )
    added = False
    for token, j, row, mask in zip(more.tokens, more.slots, more.inputs, more.anchors):
        if min(int((mask != m).sum()) for m in groups[1]) >= SAME_ANCHOR:  # a new sentence's
            found.tokens.append(token)
            found.slots.append(lacking[j])
            found.inputs.append(row)
            found.anchors.append(mask)
            added = True
    return added


def sentence_ends(
    batch: dict[str, torch.Tensor], content: torch.Tensor, slots: list[Slot]
) -> dict[int, int]:
    """Slot -> the special token ([SEP]) that ends a sentence there, where no sentence holds a
    special token mid-way (a pair's middle [SEP] would pass for an end)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    special = (~content & batch["attention_mask"].bool()).sum(1)
    if bool((special > 2).any()):
        return {}
    return {
        j: int(batch["input_ids"][b, slot.column])
        for j, slot in enumerate(slots)
        for b in slot.sentences
        if slot.column == lengths[b] - 1 and not content[b, slot.column]
    }


def sentence_pass(
    lay: ModelLayout,
    finder: Finder,
    found: FoundRows,
    anchor: torch.Tensor,
    offsets: torch.Tensor,
    candidates: list[torch.Tensor],
    counts: list[int],
    rate: float,
    last: dict[int, int],
) -> None:
    """A key module's slots still lacking inputs, searched sentence by sentence: with a
    sentence's first-token input known, its other inputs lie in the span plus that input,
    which the one-row tests decide; decoding alone missed 1 of 70 (SST-2 dev 0-3). Every
    sentence is searched first among each slot's best candidates without random restarts,
    then among all with them where rows still lack (restarts for one sentence at another's
    slots cannot succeed: SST-2 dev 0-7, B = 8, 92 s against 266 s), one row per slot, and
    where its last token (`last`: slot -> [SEP]) is found, before it only."""
    missing = list(counts)
    for j in found.slots:
        missing[j] -= 1
    groups = anchor_groups(found)
    phases = ((ANCHOR_PASS, False), (None, True))  # the best candidates, then all and restarts
    for (best, restart), mask in product(phases, groups[1] if groups is not None else []):
        if not any(n > 0 for n in missing):
            return
        held = {
            j: token
            for j, token, m in zip(found.slots, found.tokens, found.anchors)
            if bool((m == mask).all())
        }
        end = min((j for j, token in held.items() if last.get(j) == token), default=len(counts))
        lacking = [j for j, n in enumerate(missing[:end]) if n > 0 and j not in held]
        if not lacking:
            continue
        basis = extend_basis(finder.basis, (anchor * mask)[None], tol=1e-9)
        more = find_rows(
            lay,
            Finder(basis, finder.most, None),
            offsets[lacking],
            [candidates[j][:best] for j in lacking],
            [1] * len(lacking),
            rate,
            restart,
        )
        for token, j, row in zip(more.tokens, more.slots, more.inputs):
            found.tokens.append(token)
            found.slots.append(lacking[j])
            found.inputs.append(row)
            found.anchors.append(mask)
            missing[lacking[j]] -= 1


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
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Each found input given to a sentence holding its slot: by the first-token masks or the
    membership annealing for key and query modules (scored on the found inputs and their
    signals), by the signals' cohesion for value modules, else in the order found. Returns the
    token ids and how the assignment was decided."""
    ends = sentence_ends(batch, content, slots)
    by_anchor = anchor_index(found, batch["attention_mask"].cpu(), slots, ends)
    slots, pools = token_groups(slots, found, ids.cpu(), content.cpu())
    index = torch.full_like(batch["input_ids"], -1).cpu()
    for slot, pool in zip(slots, pools):
        for i, b in enumerate(slot.sentences):
            index[b, slot.column] = pool[min(i, len(pool) - 1)]
    details: dict[str, Any] = {"assignment": "one sentence"}
    plain = Membership.build(model, model.get_submodule(module), batch, target)
    complete = all(len(p) >= len(s.sentences) and p[0] >= 0 for p, s in zip(pools, slots))
    if len(index) > 1 and by_anchor is not None:
        index, note = by_anchor
        details["assignment"] = "first-token masks" + note
    if len(index) > 1 and plain is not None and complete:
        fields = {f: getattr(plain, f) for f in plain.__dataclass_fields__}
        membership = RowMembership(**fields, rows=rows, row_signals=signals)
        if by_anchor is None:
            index = anneal(membership, index, slots, pools)
            details["assignment"] = "membership"
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
        if not complete:
            details["assignment"] += " (inputs missing: their places are left empty)"
    elif len(index) > 1 and by_anchor is None:
        why = "no membership test for this module" if complete else "inputs missing"
        details["assignment"] = f"unverified ({why}): tokens sit at their positions"
    tokens = torch.tensor(found.tokens + [0])  # -1 (nothing found) reads as token 0 ([PAD])
    out = ids.clone().cpu()
    real = batch["attention_mask"].bool().cpu()
    out[real] = tokens[index[real]]
    return out, details


def anneal(
    membership: RowMembership, index: torch.Tensor, slots: list[Slot], pools: list[torch.Tensor]
) -> torch.Tensor:
    """The membership annealing from shuffled starts, then the greedy polish; then sentences
    longer than a head (to which every signal belongs) are polished among themselves by the
    windowed test (greedily: as exact as annealing on the batches measured, 4x faster), with
    the sentences the plain test still finds wrong (the long ones took their tokens, which
    they score 0 with)."""
    generator = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(RESTARTS):
        trial, score = assign(membership, index, slots, pools, generator)
        if score < best:
            best, index = score, trial
        if score < 1e-6:
            break
    index = polish(membership, index, slots, best)[0]
    long = set(membership.windowed())
    if len(long) < 2:
        return index
    own = membership.score(membership.signals(index))[0]  # a long sentence's own is always ~0
    long |= {b for b, score in enumerate(own) if score > MEMBERSHIP_EXACT}
    windowed = dataclasses.replace(membership, window=True)
    among = [
        dataclasses.replace(s, sentences=tuple(b for b in s.sentences if b in long)) for s in slots
    ]
    own, _, shared = windowed.score(windowed.signals(index))
    return polish(windowed, index, [s for s in among if len(s.sentences) > 1], sum(own) + shared)[0]


def anchor_index(
    found: FoundRows, attention: torch.Tensor, slots: list[Slot], ends: dict[int, int]
) -> tuple[torch.Tensor, str] | None:
    """Row per (sentence, column) from a key module's first-token masks: the rows that came
    with one mask form one sentence, given to the unplaced sentence of its length where its
    last token (`ends`: slot -> [SEP]) is among them or it is complete, else to the shortest
    unplaced sentence longer than its rows reach (a guess: which sentence is not known; the
    text is). Places without a row stay -1. None without masks, or where every input was
    found but the masks do not form the sentences; with the index, what was guessed."""
    groups = anchor_groups(found)
    if groups is None:
        return None
    group, masks = groups
    lengths = attention.sum(1).tolist()
    index = torch.full(attention.shape, -1, dtype=torch.long)
    free = list(range(len(lengths)))
    members = [{slots[found.slots[i]].column: i for i, k in enumerate(group) if k == g}
               for g in range(len(masks))]  # fmt: skip
    whole = [  # its [SEP] found (pairs, whose [SEP] is not known: every row found)
        any(ends.get(found.slots[i]) == found.tokens[i] for i in columns.values())
        or (not ends and len(columns) == max(columns) + 1)
        for columns in members
    ]
    guessed = []
    for g in sorted(range(len(masks)), key=lambda g: (not whole[g], -max(members[g]))):
        columns, end = members[g], max(members[g]) + 1
        sure = [b for b in free if lengths[b] == end and whole[g]]
        fits = sorted((b for b in free if lengths[b] > end), key=lambda b: lengths[b])
        if not sure:
            guessed.append(g)
        b = (sure or fits or [None])[0]
        if b is None:
            return None
        free.remove(b)
        for column, i in columns.items():
            index[b, column] = i
    missing = int((index[attention.bool()] < 0).sum())
    if (guessed or free) and len(found.tokens) == int(attention.sum()):
        return None  # every input found, the masks not the sentences: the membership decides
    note = f"; {len(guessed)} of {len(masks)} sentences placed by length, a guess" * bool(guessed)
    note += f"; {missing} inputs missing, their places left empty" * bool(missing)
    note += f"; {len(free)} sentences with no row found" * bool(free)
    return index, note


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
