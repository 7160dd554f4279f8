"""Key modules in train mode: each sentence's first-token mask, then its rows, then its place.

A layer-0 key gradient holds only differences of a sentence's inputs (its key signals sum to
zero), so every row comes with its sentence's masked first-token input: a first pass finds
rows with both masks (`Finder` with the anchor), the masks group the rows into sentences, and
each sentence's remaining rows are searched against the span plus its first-token input (the
sentence pass). The groups place the rows (`anchor_index`). Method: docs/span-method.md.
"""

from __future__ import annotations

import dataclasses
from itertools import product

import torch

from gradaudit.attacks.span.exact.dropout import Finder, FoundRows, find_rows
from gradaudit.attacks.span.exact.masks import MASK_EXACT, off_span
from gradaudit.attacks.span.exact.screening import Slot, extend_basis
from gradaudit.model.families import ModelLayout

# Candidates per slot searched first (the truth ranks up to ~70th at B = 8); the first pass
# need only find each sentence's first-token mask, the sentence pass tries all.
ANCHOR_PASS = 64
SAME_ANCHOR = 16  # coordinates two first-token masks differ in, at least, to be two


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
    missing = still_missing(found, counts)
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
            found.add(token, lacking[j], row, mask)
            added = True
    return added


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
    missing = still_missing(found, counts)
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
            found.add(token, lacking[j], row, mask)
            missing[lacking[j]] -= 1


def still_missing(found: FoundRows, counts: list[int]) -> list[int]:
    """Per slot, how many of its `counts` inputs `found` does not hold yet."""
    missing = list(counts)
    for j in found.slots:
        missing[j] -= 1
    return missing


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
        found.add(token, slot, anchor * mask, mask)


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
