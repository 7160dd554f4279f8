"""Find a sentence lost where it shares a prefix with another, once growth is done.

Growth checks a prefix once however many sentences hold it, and stops at the first next token
that fits; of two sentences sharing a prefix ("it 's a charming ..." and "it 's slow ...") one
can lose its continuation. Its slot then picks a copy of another sentence's prefix, and the
chosen inputs leave part of the row space uncovered. `repair` searches the chosen prefixes
again, shortest first, for a next token whose input lies in the row space but outside the span
of every chosen input (a row no chosen sentence explains), grows it in each suspect slot, and
lets `choose` take it where it covers more of the row space.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gradaudit.attacks.causal.grow import Beam, Grower, complete
from gradaudit.attacks.causal.prefix import truncate
from gradaudit.attacks.causal.screen import Checked, Effort
from gradaudit.attacks.causal.solve import (
    GrowthPlan,
    choose,
    concat_beams,
    explained,
    grow_all,
    suspects,
    uncovered,
)

LOST = 1e-4  # `uncovered` above this: a row is left unexplained (exact batches: below 1e-9)
# The chosen rows' prefixes up to this long are searched on the whole vocabulary when the
# screened searches find no new row: sentences share their first words ("The", "it 's"), and
# the screen can rank a lost sentence's next token tens of thousands deep (CoLA, ffn_out@1:
# " sailors" after "The").
EXHAUSTIVE_LENGTH = 4


@dataclass
class NewRow:
    """A next token (vocabulary index) after the first `length` tokens of sentence `sentence`'s
    chosen row `row`, whose input is a row of the gradient no chosen input spans."""

    sentence: int
    row: int
    length: int
    index: int
    residual: float


def cut(beam: Beam, row: int, length: int) -> Beam:
    """The first `length` tokens of `beam`'s row `row` (its cache cut to them)."""
    one = beam.take(torch.tensor([row], device=beam.tokens.device))
    return replace(
        one,
        tokens=one.tokens[:, :length],
        inputs=one.inputs[:, :length],
        kv=truncate(one.kv, length),
    )


def find_new_row(
    grower: Grower,
    done: dict[int, Beam],
    picked: dict[int, int],
    plan: GrowthPlan,
    longest: int,
    searched: set[tuple[int, ...]],
) -> NewRow | None:
    """The first next token, over the chosen prefixes shortest first (up to `longest` tokens),
    whose input is a new row (see the module docstring); every prefix searched is added to
    `searched` and not searched again. A first sweep checks only the nearest tokens of a
    regression growth fitted (most prefixes hold no new row, and a full search proves that at
    about 2,300 checks); then, for a query, a blind first token with its second
    (`_new_first_token`); then the full search, the empty prefix first: a first token the
    growth's screen missed is searched on the whole vocabulary, once for all sentences, at
    the price of about 16 prefixes' full searches, where a batch of 8 has 100-300 chosen
    prefixes (SmolLM2 key@28: 68 s against 547 s for the sweep that came before it)."""
    chosen = [done[b].inputs[r] for b, r in picked.items()]
    own = explained(grower.screen.basis, chosen, grower.options.tol)
    lengths = [n for n in range(max(1, plan.first_seen), longest) if n not in plan.fixed]
    prior = grower.regression()
    if prior is not None:  # first every prefix's nearest by a regression growth fitted
        near = replace(grower.effort, sample=grower.effort.sample[:0], rounds=0)
        new = _first_new_row(grower, done, picked, lengths, searched, own, (near, prior))
        if new is not None:
            return new
    if plan.stand_ins is not None and () not in searched:
        searched.add(())  # a query's blind first token: searched with the second
        new = _new_first_token(grower, picked, plan.stand_ins, own)
        if new is not None:
            return new
    first = [0] if plan.first_seen == 0 and 0 not in plan.fixed else []
    return _first_new_row(grower, done, picked, first + lengths, searched, own, None)


def exhaustive_new_row(
    grower: Grower,
    done: dict[int, Beam],
    picked: dict[int, int],
    copies: list[int],
    exhausted: set[tuple[int, ...]],
) -> NewRow | None:
    """The first next token, over the chosen rows' prefixes up to `EXHAUSTIVE_LENGTH` tokens
    (shortest first; at each length the `copies` slots' first), whose input is a row no
    chosen input spans, checked on the whole vocabulary (`complete`); every prefix checked is
    added to `exhausted`. Not only the copies' prefixes: a lost sentence's slot can copy a
    sentence it shares nothing with (CoLA dev 0-7, attn_output@5: "The sailors ..." lost
    behind "The more ...", its slot copying "If you had eaten more ...")."""
    chosen = [done[b].inputs[r] for b, r in picked.items()]
    own = explained(grower.screen.basis, chosen, grower.options.tol)
    none = Checked(grower.effort.sample[:0], grower.screen.basis.new_zeros(0))
    rows = copies + [b for b in picked if b not in copies]
    for length in range(1, EXHAUSTIVE_LENGTH + 1):
        for b in rows:
            prefix = tuple(done[b].tokens[picked[b], :length].tolist())
            if length >= done[b].tokens.shape[1] or prefix in exhausted:
                continue  # past its last position the gradient sees, nothing can fit
            exhausted.add(prefix)
            head = cut(done[b], picked[b], length)
            checked = complete(grower.screen, head.kv, 0, length, none, own)
            low, arg = checked.residual.min(0)
            if float(low) <= grower.options.tol:
                return NewRow(b, picked[b], length, int(checked.index[arg]), float(low))
    return None


def _new_first_token(
    grower: Grower, picked: dict[int, int], stand_ins: torch.Tensor, own: torch.Tensor
) -> NewRow | None:
    """A first token after which a second token's input is a row no chosen input spans (the
    pair search tries first the second tokens whose input lies in the part of the row space
    the chosen inputs leave unexplained)."""
    index, residual = grower.pair_search(stand_ins).first_tokens(own, wanted=1)
    if index.numel() == 0:
        return None
    b, r = next(iter(picked.items()))
    return NewRow(b, r, 0, int(index[0]), float(residual[0]))


def _first_new_row(
    grower: Grower,
    done: dict[int, Beam],
    picked: dict[int, int],
    lengths: list[int],
    searched: set[tuple[int, ...]],
    own: torch.Tensor,
    near: tuple[Effort, torch.Tensor] | None,
) -> NewRow | None:
    """`find_new_row`'s sweep over the chosen prefixes of `lengths`: with `near` (an effort
    and a prior regression) only the prior's nearest tokens, else the full search (which
    marks each prefix `searched`)."""
    screen, tol = grower.screen, grower.options.tol
    for length in lengths:
        for b, r in picked.items():
            prefix = tuple(done[b].tokens[r, :length].tolist())
            if len(prefix) < length or prefix in searched:
                continue
            if length == 0:
                checked = grower.first_position.check(grower.effort, own, exhaustive=True)
            elif near is not None:
                head = cut(done[b], r, length)
                checked = screen.check(head.kv, 0, length, near[0], own, near[1], False)
            else:
                head = cut(done[b], r, length)
                checked = screen.check(head.kv, 0, length, grower.effort, own)
            searched.update([prefix] if near is None else [])
            low, arg = checked.residual.min(0)
            if float(low) <= tol:
                return NewRow(b, r, length, int(checked.index[arg]), float(low))
    return None


def grow_new_row(
    grower: Grower,
    done: dict[int, Beam],
    new: NewRow,
    slots: list[int],
    lengths: list[int],
    plan: GrowthPlan,
) -> dict[int, Beam]:
    """`new`'s prefix and token grown to the end of each slot in `slots` long enough for it."""
    slots = [b for b in slots if lengths[b] - plan.unseen_tail > new.length]
    if not slots:
        return {}
    head = cut(done[new.sentence], new.row, new.length)
    rows = torch.zeros(len(slots), dtype=torch.long, device=head.tokens.device)
    ids = grower.screen.vocab[torch.full_like(rows, new.index)]
    x, kv = grower.screen.extend(head.kv, rows, new.length, ids)
    x = x if new.length >= plan.first_seen else torch.zeros_like(x)  # a blind position
    score = head.score.clamp_min(new.residual).expand(len(slots))
    beam = Beam(
        torch.cat([head.tokens[rows], ids[:, None]], 1),
        torch.tensor(slots, device=rows.device),
        score.clone(),
        torch.cat([head.inputs[rows], x[:, None].to(head.inputs.dtype)], 1),
        kv,
        head.unsure,
    )
    return grow_all(grower, lengths, plan, beam)


def repair(
    grower: Grower,
    done: dict[int, Beam],
    picked: dict[int, int],
    lengths: list[int],
    plan: GrowthPlan,
    basis: torch.Tensor,
) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """`picked` improved while the chosen inputs leave a row unexplained (see the module
    docstring), and the (sentence, shared prefix length) of every repair taken; `done` gains
    the grown rows."""
    searched: set[tuple[int, ...]] = set()
    exhausted: set[tuple[int, ...]] = set()
    repaired: list[tuple[int, int]] = []
    tol = grower.options.tol
    gap = uncovered(basis, [done[b].inputs[r] for b, r in picked.items()], tol)
    while gap > LOST and len(repaired) < len(done):  # a repair recovers a sentence
        slots = suspects(done, picked, tol)
        if not slots:
            break
        longest = max(lengths[b] - plan.unseen_tail for b in slots)
        new = find_new_row(grower, done, picked, plan, longest, searched)
        if new is None:
            copies = [b for b in slots if float(done[b].score[picked[b]]) <= tol]
            new = exhaustive_new_row(grower, done, picked, copies, exhausted)
        if new is None:
            break
        for b, grown in grow_new_row(grower, done, new, slots, lengths, plan).items():
            done[b] = concat_beams([done[b], grown])
        again = choose(done, basis, tol)
        after = uncovered(basis, [done[b].inputs[r] for b, r in again.items()], tol)
        if after >= gap:
            continue  # a dead end: its prefix stays searched
        # the prefix may hold more sentences: search it again
        prefix = tuple(done[new.sentence].tokens[new.row, : new.length].tolist())
        searched.discard(prefix)
        exhausted.discard(prefix)
        changed = [b for b in again if again[b] != picked[b]]
        repaired += [(b, new.length) for b in changed if b in slots]
        picked, gap = again, after
    return picked, repaired
