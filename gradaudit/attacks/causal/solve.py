"""The whole batch: grow every sentence to its last visible position, then pick one prefix per
sentence so that together their inputs span the row space (`choose`)."""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch

from gradaudit.attacks.causal.grow import Beam, Grower
from gradaudit.attacks.causal.screen import orthonormal_rows, relative_residual

MAX_COMBINATIONS = 256  # beyond this many choices, `choose` improves one sentence at a time


@dataclass
class GrowthPlan:
    """What the gradient sees: rows from `first_seen` on, none for the last `unseen_tail`
    positions of a sentence (a causal LM's last token); `fixed` tokens the tokenizer puts at
    known positions. A blind position (listed in `blind`) is branched on the vocabulary's
    `guesses` commonest tokens (lowest ids; all of a small vocabulary), and the next position
    keeps the guesses after which a token fits. A query's blind first token is also branched
    on the first tokens the pair search finds after the `stand_ins` (vocabulary indices, set
    only for a query; `pairs`), which the next position checks fully."""

    width: int
    first_seen: int = 0
    unseen_tail: int = 1
    fixed: dict[int, int] = field(default_factory=dict)
    guesses: int = 1024
    stand_ins: torch.Tensor | None = None
    blind: list[tuple[int, int]] = field(default_factory=list)


def concat_beams(beams: list[Beam]) -> Beam:
    """Rows of several beams of the same length, stacked."""
    from gradaudit.attacks.causal.prefix import concat

    first = beams[0]
    if len(beams) == 1:
        return first
    cat = [torch.cat([getattr(b, k) for b in beams]) for k in ("tokens", "sentence", "score")]
    inputs = torch.cat([b.inputs for b in beams])
    return Beam(*cat, inputs, concat([b.kv for b in beams]), first.unsure)


def branch(grower: Grower, beam: Beam, position: int, ids: torch.Tensor, seen: bool) -> Beam:
    """Every row with every token of `ids` at `position`, unchecked: a known token (`seen`:
    its input is one of the gradient's rows) or one the gradient does not see."""
    n = int(beam.tokens.shape[0])
    rows = torch.arange(n, device=ids.device).repeat_interleave(len(ids))
    ids = ids.repeat(n)
    x, kv = grower.screen.extend(beam.kv, rows, position, ids)
    x = (x if seen else torch.zeros_like(x))[:, None].to(beam.inputs.dtype)
    return Beam(
        torch.cat([beam.tokens[rows], ids[:, None]], 1),
        beam.sentence[rows],
        beam.score[rows],
        torch.cat([beam.inputs[rows], x], 1),
        kv,
        beam.unsure,
    )


def empty_beam(grower: Grower, sentences: int, width: int) -> Beam:
    """One empty prefix per sentence."""
    device, dtype = grower.screen.vocab.device, grower.screen.basis.dtype
    return Beam(
        torch.zeros(sentences, 0, dtype=torch.long, device=device),
        torch.arange(sentences, device=device),
        torch.zeros(sentences, dtype=torch.float64, device=device),
        torch.zeros(sentences, 0, width, dtype=dtype, device=device),
        grower.screen.runner.empty(),
    )


def grow_all(
    grower: Grower, lengths: list[int], plan: GrowthPlan, beam: Beam | None = None
) -> dict[int, Beam]:
    """Per sentence, its prefixes up to its last position the gradient sees (`plan`): every
    sentence from the empty prefix, or the sentences of `beam` from its prefixes."""
    device = grower.screen.vocab.device
    if beam is None:
        beam = empty_beam(grower, len(lengths), plan.width)
    done: dict[int, Beam] = {}
    guesses = None  # tokens the last position was branched on as guesses: checked quickly
    for position in range(int(beam.tokens.shape[1]), max(lengths) + 1):
        ends = torch.tensor(lengths, device=device)[beam.sentence] - plan.unseen_tail
        ending = set(beam.sentence[ends == position].tolist())
        for s in ending:
            done[s] = beam.take((beam.sentence == s).nonzero()[:, 0])
        live = ends > position
        if not live.any():
            break
        beam = beam.take(live.nonzero()[:, 0])
        vocab = grower.screen.vocab
        if position in plan.fixed:
            ids = torch.tensor([plan.fixed[position]], device=device)
            beam = branch(grower, beam, position, ids, position >= plan.first_seen)
        elif position >= plan.first_seen:
            quick = None if guesses is None else torch.isin(beam.tokens[:, -1], guesses)
            beam = grower.step(beam, position, len(ending), quick=quick)
            guesses = None
        else:  # unseen: branch on every token, or on likely ones, judged by the next one
            plan.blind.extend((s, position) for s in beam.sentence.unique().tolist())
            ids, guesses = vocab[: plan.guesses], None
            if len(vocab) > plan.guesses:
                guesses = ids
                if plan.stand_ins is not None and position == 0:
                    pairs = grower.pair_search(plan.stand_ins)
                    none = grower.screen.basis[:0]
                    found = vocab[pairs.first_tokens(none)[0]]
                    guesses = ids[~torch.isin(ids, found)]
                    ids = torch.cat([found, guesses])
            beam = branch(grower, beam, position, ids, False)
    return done


def explained(basis: torch.Tensor, inputs: list[torch.Tensor], tol: float) -> torch.Tensor:
    """An orthonormal basis of the span of the `inputs` that lie in the row space (relative
    residual at most `tol`): a best guess that does not fit explains nothing, though its
    random part falls partly inside."""
    x = torch.cat(inputs).to(basis.dtype)
    return orthonormal_rows(x[relative_residual(x, basis) <= tol])


def uncovered(basis: torch.Tensor, inputs: list[torch.Tensor], tol: float) -> float:
    """1 - |V Q|^2 / r: how much of the row space the chosen prefixes' inputs that fit it
    (`explained`) leave out."""
    q = explained(basis, inputs, tol)
    if q.shape[0] == 0 or basis.shape[0] == 0:
        return 1.0
    return float(1 - (basis @ q.T).square().sum() / basis.shape[0])


def suspects(done: dict[int, Beam], picked: dict[int, int], tol: float) -> list[int]:
    """Sentences whose chosen prefix adds no row of its own or does not fit the row space:
    one that begins another's that fits, and both of two equal ones (either can be the copy:
    SmolLM2 query@15 lost "it 's a charming ..." where "it 's slow ..." filled its slot and
    the other's, and only the later slot took the repair's new sentence). A sentence followed
    by best guesses in a longer slot does not make its whole fit in its own slot a copy."""
    chosen = {b: done[b].tokens[r] for b, r in picked.items()}
    fits = {b: float(done[b].score[r]) <= tol for b, r in picked.items()}
    out = []
    for b, t in chosen.items():
        copy = any(
            c != b and fits[c] and len(u) >= len(t) and torch.equal(u[: len(t)], t)
            for c, u in chosen.items()
        )
        if copy or not fits[b]:
            out.append(b)
    return out


def pick_cost(
    done: dict[int, Beam], basis: torch.Tensor, tol: float, picked: dict[int, int]
) -> tuple[float, int, float]:
    """What `choose` minimises: the row space the picked prefixes leave out, then how many of
    them are `suspects` (a sentence that fits its whole slot beats the same sentence in a
    longer slot, where best guesses follow it), then the worst residual."""
    parts = [done[s].inputs[r] for s, r in picked.items()]
    worst = max(float(done[s].score[r]) for s, r in picked.items())
    return round(uncovered(basis, parts, tol), 6), len(suspects(done, picked, tol)), worst


def choose(done: dict[int, Beam], basis: torch.Tensor, tol: float) -> dict[int, int]:
    """Per sentence, the row of its beam that with the others' chosen ones minimises
    `pick_cost`. A sentence repeated in the batch, or one that is a prefix of a longer one, is
    told apart this way."""
    sentences = sorted(done)
    options = [list(range(done[s].tokens.shape[0])) for s in sentences]

    @functools.cache  # the sweeps below score one pick again and again
    def cost(pick: tuple[int, ...]) -> tuple[float, int, float]:
        return pick_cost(done, basis, tol, dict(zip(sentences, pick)))

    if math.prod(map(len, options)) <= MAX_COMBINATIONS:
        best = min(itertools.product(*options), key=cost)
    else:
        best, moved = tuple(0 for _ in sentences), True
        while moved:  # until no sentence's choice improves (two sweeps were not enough)
            moved = False
            for i, o in enumerate(options):
                pick = min((best[:i] + (r,) + best[i + 1 :] for r in o), key=cost)
                moved, best = moved or cost(pick) < cost(best), pick
    return dict(zip(sentences, best))
