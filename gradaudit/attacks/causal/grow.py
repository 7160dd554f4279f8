"""Grow every sentence of the batch position by position: a beam of prefixes per sentence.

At a position the gradient sees (one with a loss path), a prefix survives with each next
token whose module input lies in the row space: the screen checks a sample of tokens exactly,
then the ones its regression puts nearest the row space, and the whole vocabulary if need be.
A fit is a residual below `tol` and within `ratio` of that prefix's best; each sentence keeps
its `beam` prefixes of lowest worst residual. A sentence whose prefixes all fail keeps its best
token there, recorded in `unsure`. All sentences grow together, so a token another sentence
holds at the same slot fits too (duplicates): the beam carries both until they part.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from gradaudit.attacks.causal.first import FirstPosition
from gradaudit.attacks.causal.guess import NextTokenGuess
from gradaudit.attacks.causal.options import CausalOptions
from gradaudit.attacks.causal.pairs import PairSearch
from gradaudit.attacks.causal.prefix import KV, select
from gradaudit.attacks.causal.screen import Checked, Effort, Screen, orthonormal_rows


@dataclass
class Beam:
    """Prefix rows: tokens (N, t), sentence (N,), worst residual (N,), module inputs
    (N, t, width) and their cache."""

    tokens: torch.Tensor
    sentence: torch.Tensor
    score: torch.Tensor
    inputs: torch.Tensor
    kv: KV
    unsure: list[tuple[int, int]] = field(default_factory=list)

    def take(self, rows: torch.Tensor) -> Beam:
        return Beam(
            self.tokens[rows],
            self.sentence[rows],
            self.score[rows],
            self.inputs[rows],
            select(self.kv, rows),
            self.unsure,
        )


@dataclass
class Fits:
    """Per candidate of one position: prefix row, vocabulary index and residual."""

    rows: torch.Tensor
    index: torch.Tensor
    residual: torch.Tensor


CHUNK = 4096  # tokens a stuck prefix checks at a time, in the regression's order


def complete(
    screen: Screen,
    kv: KV,
    row: int,
    position: int,
    checked: Checked,
    own: torch.Tensor,
    chunks: int | None = None,
) -> Checked:
    """`checked` and the rest of the vocabulary, checked exactly after prefix row `row` in
    the last regression's order, `CHUNK` tokens at a time until one fits (or after `chunks`
    of them): the first 4,096 held 10 of 12 stuck prefixes' next tokens on SmolLM2
    ffn_out@1, and the rest ranked up to 39,158th."""
    ids = checked.rest
    if ids is None:
        unchecked = torch.ones(
            int(screen.vocab.shape[0]), dtype=torch.bool, device=checked.index.device
        )
        unchecked[checked.index] = False
        ids = unchecked.nonzero()[:, 0]
        if checked.coef is not None:
            ids = ids[screen.ranker.predicted_residual(checked.coef)[ids].argsort()]
        checked = replace(checked, rest=ids)
    for start in range(0, int(ids.shape[0]), CHUNK)[:chunks]:
        part = ids[start : start + CHUNK]
        x = screen.evaluator(kv, row, position)(part)
        residual = torch.cat([checked.residual, screen.novel_residual(x, own)])
        index = torch.cat([checked.index, part])
        checked = Checked(index, residual, checked.coef, ids[start + CHUNK :])
        if bool((checked.residual <= screen.tol).any()):
            break
    return checked


class Grower:
    """One position's step for all live prefixes (see the module docstring)."""

    def __init__(
        self,
        screen: Screen,
        options: CausalOptions,
        generator: torch.Generator,
        rounds: int,
        guess: NextTokenGuess | None = None,
    ) -> None:
        self.screen = screen
        self.guess = guess  # a causal LM's own next tokens, checked before the sample
        self.first_position = FirstPosition(screen)
        self.options = options
        self._fitted: dict[tuple[int, ...], torch.Tensor] = {}  # per prefix: its regression
        self._pairs: PairSearch | None = None
        size = int(screen.vocab.shape[0])
        frequent = torch.arange(min(options.frequent, size))
        others = torch.randperm(size - len(frequent), generator=generator)[: options.sample]
        sample = torch.cat([frequent, others + len(frequent)]).to(screen.vocab.device)
        # rounds: the options' scaled by the attack's budget. After a prior regression every
        # token of the batch comes near the row space, so as many as its rank are checked:
        # 64 missed SST-2's " slow" after "it 's" (ranked 68th) at query@1, B = 8.
        prior_count = max(options.screen, int(screen.basis.shape[0]))
        self.effort = Effort(sample, options.screen, rounds, options.tol, prior_count)
        self.known = sample[:0]  # vocabulary indices of every token a beam has held

    def regression(self) -> torch.Tensor | None:
        """A regression fitted at the last position grown (its nearest tokens are the batch's
        tokens at any position), or None."""
        return next(iter(self._fitted.values()), None)

    def pair_search(self, stand_ins: torch.Tensor) -> PairSearch:
        """The search of a query's blind first tokens with the second (see `pairs`), built
        on first use."""
        if self._pairs is None:
            opts, sample = self.options, self.effort.sample
            step = max(1, len(sample) // opts.pair_sample)
            self._pairs = PairSearch(
                self.screen, replace(self.effort, sample=sample[::step]), stand_ins
            )
        return self._pairs

    def first(self, beam: Beam) -> tuple[Fits, torch.Tensor, torch.Tensor]:
        """`fits` at position 0: every row is the empty prefix, so the tokens are checked once
        for all (see `first`)."""
        screen, opts = self.screen, self.options
        n = int(beam.tokens.shape[0])
        none = screen.basis.new_zeros(0, screen.basis.shape[1])
        checked = self.first_position.check(self.effort, none, exhaustive=False, enough=n)
        res = checked.residual
        best, arg = res.min(0)
        ok = (res <= opts.tol) & (res <= best * opts.ratio)
        index, res = checked.index[ok], res[ok]
        rows = torch.arange(n, device=index.device)
        fits = Fits(rows.repeat_interleave(len(index)), index.repeat(n), res.repeat(n))
        return fits, best.expand(n), checked.index[arg].expand(n)

    def fits(
        self, beam: Beam, position: int, ending: int, quick: torch.Tensor | None = None
    ) -> tuple[Fits, torch.Tensor, torch.Tensor]:
        """Candidates that fit, and per row its best residual and token (vocabulary index).

        `quick` (per row; rows that are guesses of a token the gradient does not see): such
        a row checks only the `screen` tokens that a regression fitted at this position
        already puts nearest the row space, so that a thousand guesses cost a few thousand
        checks."""
        if position == 0:
            return self.first(beam)
        opts = self.options
        n = int(beam.tokens.shape[0])
        spans = [orthonormal_rows(beam.inputs[row]) for row in range(n)]
        prefixes = [tuple(beam.tokens[row].tolist()) for row in range(n)]
        checked: dict[int, Checked] = {}  # per head: the first row of its prefix
        efforts: dict[int, Effort] = {}
        first_row: dict[tuple[int, ...], int] = {}  # sentences share prefixes: check each once
        shared = None
        for row in range(n):
            if prefixes[row] in first_row:
                continue
            first_row[prefixes[row]] = row
            prior = self._fitted.get(prefixes[row][:-1], shared)
            thorough = quick is None or not bool(quick[row]) or prior is None
            efforts[row] = (
                replace(self.effort, known=self.known) if thorough else self.effort.quick()
            )
            c = self.screen.check(beam.kv, row, position, efforts[row], spans[row], prior, False)
            shared = c.coef if shared is None else shared
            checked[row] = c
        self._search_further(beam, position, ending, checked, efforts, spans, quick)
        per_row = [checked[first_row[prefix]] for prefix in prefixes]
        self._fitted = {p: c.coef for p, c in zip(prefixes, per_row) if c.coef is not None}
        fitting, best, best_index = [], [], []
        for row, c in enumerate(per_row):
            low, arg = c.residual.min(0)
            ok = (c.residual <= opts.tol) & (c.residual <= low * opts.ratio)
            fitting.append(Fits(torch.full_like(c.index[ok], row), c.index[ok], c.residual[ok]))
            best.append(low)
            best_index.append(c.index[arg])
        merged = Fits(
            *(torch.cat([getattr(f, k) for f in fitting]) for k in ("rows", "index", "residual"))
        )
        return merged, torch.stack(best), torch.stack(best_index)

    def _search_further(
        self,
        beam: Beam,
        position: int,
        ending: int,
        checked: dict[int, Checked],
        efforts: dict[int, Effort],
        spans: list[torch.Tensor],
        quick: torch.Tensor | None,
    ) -> None:
        """The sampled stage for every prefix (head row) the prior stage found no next token
        after; then, while more such prefixes fitted everywhere than the `ending` sentences
        explain, the rest of the vocabulary for them (`complete`), a chunk each in
        turn: a prefix that ended a sentence is a dead end the whole vocabulary cannot fit."""
        fits = self.effort.fits
        needy = [head for head, c in checked.items() if not bool(fits(c.residual).any())]
        self._add_guesses(beam, needy, efforts)
        for head in needy:
            checked[head] = self.screen.resume(
                beam.kv, head, position, efforts[head], spans[head], checked[head]
            )
        stuck = [
            head
            for head, c in checked.items()
            if float(beam.score[head]) <= self.options.tol
            and (quick is None or not bool(quick[head]))
            and not bool(fits(c.residual).any())
        ]
        while len(stuck) > ending:
            for head in stuck:
                checked[head] = complete(
                    self.screen, beam.kv, head, position, checked[head], spans[head], chunks=1
                )
            stuck = [
                head
                for head in stuck
                if not bool(fits(checked[head].residual).any()) and len(checked[head].rest)
            ]

    def _add_guesses(self, beam: Beam, heads: list[int], efforts: dict[int, Effort]) -> None:
        """The model's likeliest next tokens (`guess`) after the prefixes of `heads` whose
        effort is thorough (a quick one, a guessed row's, checks the prior's nearest only)."""
        heads = [head for head in heads if efforts[head].known is not None]
        if self.guess is None or not heads or beam.tokens.shape[1] == 0:
            return
        ranked = self.guess.likeliest(beam.tokens[heads])
        for head, guess in zip(heads, ranked):
            efforts[head] = replace(efforts[head], guess=guess)

    def step(
        self, beam: Beam, position: int, ending: int = 0, quick: torch.Tensor | None = None
    ) -> Beam:
        """The beam one position longer (every row's sentence sees `position`); `ending`:
        how many sentences' visible parts end just before it."""
        fits, best, best_index = self.fits(beam, position, ending, quick)
        keep_rows, keep_index, keep_score = [], [], []
        live = beam.sentence.unique().tolist()
        size = self.options.beam + len(live) - 1  # room for every sentence's prefixes
        for b in live:
            mine = beam.sentence[fits.rows] == b
            rows, index = fits.rows[mine], fits.index[mine]
            score = torch.maximum(beam.score[rows], fits.residual[mine])
            if rows.numel() == 0:  # nothing fits: its best token, recorded as unsure
                own = (beam.sentence == b).nonzero()[:, 0]
                row = own[best[own].argmin()]
                rows, index = row[None], best_index[row][None]
                score = torch.maximum(beam.score[rows], best[rows])
                beam.unsure.append((b, position))
            order = score.argsort()[:size]
            keep_rows.append(rows[order])
            keep_index.append(index[order])
            keep_score.append(score[order])
        rows, index = torch.cat(keep_rows), torch.cat(keep_index)
        self.known = torch.cat([self.known, index]).unique()
        ids = self.screen.vocab[index]
        x, kv = self.screen.extend(beam.kv, rows, position, ids)
        return Beam(
            torch.cat([beam.tokens[rows], ids[:, None]], 1),
            beam.sentence[rows],
            torch.cat(keep_score),
            torch.cat([beam.inputs[rows], x[:, None].to(beam.inputs.dtype)], 1),
            kv,
            beam.unsure,
        )
