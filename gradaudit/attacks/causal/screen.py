"""Which tokens' module inputs lie in the gradient's row space, after a cached prefix.

Checking a token exactly costs a one-token forward pass; checking the whole vocabulary at
every position of every prefix is too slow past the first layers, and a first-order screen
(linearising in the token's embedding) ranks the truth thousands deep on a real decoder. What
works is a learned map from context-free token features to in-context inputs. The features are
every token's input to the module (or, past layer 2 for an input of the residual stream, to the
same component at layer 2) at position 1 after an anchor token, ".": one pass over the
vocabulary per attack. At a prefix, a sample of tokens is checked exactly, a ridge regression
from their features to their inputs predicts every other token's input, and the tokens
predicted nearest the row space are checked exactly and the regression refitted with them,
`rounds` times. The grower checks the rest of the vocabulary (`complete`) where that finds
nothing and a sentence cannot have ended.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from gradaudit.attacks.causal.prefix import KV, PrefixRunner, concat

RIDGE = 1e-3  # ridge weight, relative to the features' mean squared norm
PRIOR_PULL = 0.1  # the same, towards a prior regression (1.0 measured alike)
NEAREST_KEPT = 256  # regressions whose nearest tokens are remembered
SKETCH = 128  # random directions of the complement that estimate a prediction's residual
SHORTLIST = 4096  # best estimates whose residual is then predicted exactly
# A rough twin's input counts as a possible fit (and is computed again exactly) when its
# residual is within tol + this many times the largest relative error the twin made on the
# first CALIBRATION inputs (computed both ways) and on every input computed again, or when it
# is among the ROUGH_BEST lowest of its call. A true token's rough residual is the part of the
# twin's error outside the row space, so at most that error: SmolLM2 key@28 (SST-2 dev 0-7,
# position 2 on), inputs erred by up to 0.067 and true tokens' rough residuals by up to 0.023,
# while false tokens' residuals started at 0.147 (a margin of 0.2 sends 0.1 % of them to the
# exact check; 10 x 0.067 sent two thirds). The error is heavy-tailed (key@28: 99th percentile
# 0.024, largest 0.067; query@5: 99.9th 0.015-0.023, largest 0.062-0.092): the calls' best
# catch a true input erred on past the margin, which still lies nearer the row space than
# the false ones. Positions before ROUGH_FROM are always exact: they attend to the first token
# (an attention sink), where SmolLM2's bfloat16 twin erred by up to 0.61 (0.015 at the 99.9th
# percentile later); at position 0 itself the twin filtered nothing at key@28.
ROUGH_MARGIN = 5.0
ROUGH_BEST = 4
CALIBRATION = 256
ROUGH_FROM = 2
# A twin that sends more than this share of its inputs to the exact check only adds time (its
# pass costs about 0.4 of an exact one): it is given up once CALIBRATION inputs have passed.
USELESS_SHARE = 0.5


def relative_residual(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """|x - V^T V x| / |x| per row, in float64; 1 for a zero row (a token whose input is zero,
    such as a padding embedding, adds no row to the gradient: nothing confirms it)."""
    x = x.to(basis.dtype)
    norm = x.norm(dim=-1)
    return (outside_norm(x, basis) / norm.clamp_min(torch.finfo(basis.dtype).tiny)).masked_fill(
        norm == 0, 1.0
    )


def outside_norm(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """|part of inputs `x` (..., width) outside the row space of `basis`| per input."""
    return (x - (x @ basis.T) @ basis).norm(dim=-1)


def orthonormal_rows(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (k, width) of the span of the non-zero rows of `x` (t, width)."""
    x = x[x.norm(dim=-1) > 0]
    if x.shape[0] == 0:
        return x
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[s > s[0] * 1e-6]


@dataclass
class Checked:
    """Tokens checked exactly after one prefix: vocabulary indices, their residuals, and the
    regression last fitted there (None when none was)."""

    index: torch.Tensor
    residual: torch.Tensor
    coef: torch.Tensor | None = None
    rest: torch.Tensor | None = None  # the unchecked ones in the regression's order (complete)
    inputs: torch.Tensor | None = None  # the checked tokens' inputs, while a prior is refitted


@dataclass(frozen=True)
class Effort:
    """How hard a search tries: the `prior_count` tokens a prior regression puts nearest,
    then the `count` likeliest of the model's `guess` (vocabulary indices, likeliest first),
    the `known` tokens (found elsewhere in the batch) and the rest of the `guess`, then
    `rounds` rounds of the prior refitted, then the `sample` and `rounds` rounds of its
    regression: `count` tokens a round, doubling each round; a fit is a residual at most
    `tol`."""

    sample: torch.Tensor
    count: int
    rounds: int
    tol: float
    prior_count: int
    known: torch.Tensor | None = None
    guess: torch.Tensor | None = None

    def listed(self) -> list[torch.Tensor]:
        """The tokens checked before the sample, in the order they are checked."""
        guess = self.sample[:0] if self.guess is None else self.guess
        known = self.sample[:0] if self.known is None else self.known
        return [guess[: self.count], known, guess[self.count :]]

    def fits(self, residual: torch.Tensor) -> torch.Tensor:
        return residual <= self.tol

    def quick(self) -> Effort:
        """Only the `count` tokens a prior regression puts nearest: no sample, no rounds."""
        return replace(
            self, sample=self.sample[:0], rounds=0, prior_count=self.count, known=None, guess=None
        )


class Ranker:
    """A ridge regression from fixed per-token features (V, f) to module inputs, and the
    residual against the row space it predicts for every token.

    Where the row space's complement is wide (a 1,536-wide FFN input), the part outside it is
    first estimated from `SKETCH` random directions of the complement (Johnson-Lindenstrauss),
    and only the `SHORTLIST` best estimates get the exact prediction: the exact ranking was
    about 60 % of the attack's time at ffn_out. The estimate is computed in `sketch_dtype`
    (bfloat16 where the device has it natively: 4-5 times faster on this CPU, and its
    rounding is far below the sketch's own error)."""

    def __init__(
        self, features: torch.Tensor, basis: torch.Tensor, sketch_dtype: torch.dtype | None = None
    ) -> None:
        self.features = features
        self.single = features.float()  # ranking only: float32
        self.rough = self.single if sketch_dtype is None else features.to(sketch_dtype)
        self.rank = rank = int(basis.shape[0])
        # rows: the row space's basis, then its orthogonal complement
        self.frame = torch.linalg.qr(basis.T, mode="complete")[0].T.float()
        outside = int(basis.shape[1]) - rank
        self.sketch: torch.Tensor | None = None
        if outside > 2 * SKETCH and features.shape[0] > 2 * SHORTLIST:
            seeded = torch.Generator().manual_seed(0)
            gauss = torch.randn(outside, SKETCH, generator=seeded) / SKETCH**0.5
            self.sketch = gauss.to(device=features.device, dtype=torch.float32)

    def fit(
        self, index: torch.Tensor, x: torch.Tensor, toward: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The regression (f, width), fitted on tokens `index` and their inputs `x`: ridge
        towards zero, or with `toward` (a regression fitted before) pulled towards that one,
        so that the few hundred tokens checked at one prefix can correct a neighbour's fit.
        Its products are summed in float32 (half the time at ffn_out's 1,537 features; the
        ranking is float32 anyway), the solve in float64."""
        feats = self.single[index]
        gram = (feats.T @ feats).double()
        rhs = (feats.T @ x.float()).double()
        ridge = RIDGE * float(gram.diagonal().mean())
        if toward is not None:
            ridge = PRIOR_PULL * float(gram.diagonal().mean())
            rhs = rhs + ridge * toward
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + ridge * eye, rhs)

    def predicted_residual(self, coef: torch.Tensor) -> torch.Tensor:
        """Relative residual (V,) of every token's input as `coef` predicts it: one matmul
        into the frame (basis, complement), or the sketch's estimate and the shortlist's exact
        values, every shortlisted token ranked before the rest."""
        into = coef.float() @ self.frame.T
        if self.sketch is None:
            return self._ratio(self.single @ into)
        r, dtype = self.rank, self.rough.dtype
        inside = torch.linalg.vector_norm(self.rough @ into[:, :r].to(dtype), dim=1).float()
        outside = self.rough @ (into[:, r:] @ self.sketch).to(dtype)
        outside = torch.linalg.vector_norm(outside, dim=1).float()
        score = outside / torch.hypot(inside, outside).clamp_min(torch.finfo(inside.dtype).tiny)
        short = score.topk(SHORTLIST, largest=False)[1]
        exact = self._ratio(self.single[short] @ into)
        score = torch.maximum(score, exact.max())  # no host sync
        score[short] = exact
        return score

    def _ratio(self, y: torch.Tensor) -> torch.Tensor:
        """|complement part| / |y| per row of `y` in frame coordinates."""
        total = torch.linalg.vector_norm(y, dim=1).clamp_min(torch.finfo(y.dtype).tiny)
        return torch.linalg.vector_norm(y[:, self.rank :], dim=1) / total


class Screen:
    """Exact checks of next tokens after prefix rows of a cache, led by the regression."""

    def __init__(
        self,
        runner: PrefixRunner,
        basis: torch.Tensor,
        vocab: torch.Tensor,
        forward_batch: int,
        tol: float,
        anchor: int,
        feature_runner: PrefixRunner | None = None,
        rough: PrefixRunner | None = None,
    ) -> None:
        self.runner = runner
        self.rough = rough  # the observed module in a rough twin: it filters exact checks
        self.rough_error = 0.0  # its largest relative error on the inputs calibrated
        self.calibrated = 0
        self.rough_checks = 0  # inputs the twin computed, and how many of them again exactly
        self.exact_again = 0
        self.feature_runner = feature_runner or runner
        self.basis = basis
        self.vocab = vocab  # candidate token ids (V,)
        self.forward_batch = forward_batch
        self.tol = tol  # a fit, and an echo: a relative residual at most this
        self.anchor = anchor  # the token id the features follow
        self._ranker: Ranker | None = None
        self._nearest: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def ranker(self) -> Ranker:
        """The regression over every candidate's features: its input to the feature module
        (this module, or the same component at a shallow layer) at position 1 after the
        anchor, and a constant; computed on first use (position 0 needs none)."""
        if self._ranker is None:
            runner, device = self.feature_runner, self.vocab.device
            one = torch.zeros(1, dtype=torch.long, device=device)
            with torch.no_grad():
                _, kv = runner.run(
                    runner.empty(), one, 0, ids=torch.tensor([self.anchor], device=device)
                )
            x = self.inputs(kv, torch.zeros_like(self.vocab), 1, self.vocab, runner)
            self._ranker = self.ranker_of(x)
        return self._ranker

    def ranker_of(self, x: torch.Tensor) -> Ranker:
        """A regression from features `x` (V, f) and a constant to this row space's inputs,
        its sketch in the rough twin's dtype where that is bfloat16 (float16's range is too
        narrow for sums over 1,536 features)."""
        rough = self.rough is not None and self.rough.dtype == torch.bfloat16
        features = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        return Ranker(features, self.basis, torch.bfloat16 if rough else None)

    @torch.no_grad()
    def inputs(
        self,
        kv: KV,
        rows: torch.Tensor,
        position: int,
        ids: torch.Tensor,
        runner: PrefixRunner | None = None,
    ) -> torch.Tensor:
        """Module inputs (M, width), float64, of tokens `ids` after prefix rows `rows` (M,)
        (of the module `runner` stops at: by default the observed one). With a rough twin,
        the observed module's inputs from position `ROUGH_FROM` on are computed roughly and
        only the ones that may fit (`ROUGH_MARGIN`, `ROUGH_BEST`) again exactly: the others'
        residuals are as far from a fit."""
        runner = runner or self.runner
        exact_only = not self.rough_useful or position < ROUGH_FROM or rows.numel() == 0
        if runner is not self.runner or exact_only:
            return self._inputs(kv, rows, position, ids, runner)
        x = self._inputs(kv, rows, position, ids, self.rough)
        if self.calibrated < CALIBRATION:  # the first calls measure the twin's error
            exact = self._inputs(kv, rows, position, ids, runner)
            self._measure(x, exact)
            self.calibrated += int(rows.shape[0])
            return exact
        margin = self.tol + ROUGH_MARGIN * self.rough_error
        residual = relative_residual(x, self.basis)
        near = residual <= margin
        near[residual.topk(min(ROUGH_BEST, len(residual)), largest=False).indices] = True
        near = near.nonzero()[:, 0]
        self.rough_checks += int(rows.shape[0])
        self.exact_again += int(near.shape[0])
        if near.numel():
            exact = self._inputs(kv, rows[near], position, ids[near], runner)
            self._measure(x[near], exact)  # the margin follows the error where it matters
            x[near] = exact
        return x

    def rough_summary(self) -> dict[str, object] | None:
        """What the rough twin did (for `info`), or None without one."""
        if self.rough is None:
            return None
        return {
            "dtype": str(self.rough.dtype).removeprefix("torch."),
            "largest_error": self.rough_error,
            "checked": self.rough_checks,
            "checked_again_exactly": self.exact_again,
            "given_up": not self.rough_useful,  # too rough to filter: exact from then on
        }

    @property
    def rough_useful(self) -> bool:
        """Whether a rough twin filters the exact checks (see `USELESS_SHARE`)."""
        if self.rough is None:
            return False
        return (
            self.rough_checks < CALIBRATION or self.exact_again <= USELESS_SHARE * self.rough_checks
        )

    def _measure(self, rough: torch.Tensor, exact: torch.Tensor) -> None:
        """`rough_error` raised to the twin's largest relative error on these inputs."""
        norm = exact.norm(dim=-1)
        error = ((rough - exact).norm(dim=-1) / norm.clamp_min(1e-30))[norm > 0]
        if error.numel():
            self.rough_error = max(self.rough_error, float(error.max()))

    def _inputs(
        self, kv: KV, rows: torch.Tensor, position: int, ids: torch.Tensor, runner: PrefixRunner
    ) -> torch.Tensor:
        """`inputs` by `runner` alone, `forward_batch` rows a pass."""
        out = []
        for start in range(0, int(rows.shape[0]), self.forward_batch):
            part = slice(start, start + self.forward_batch)
            x, _ = runner.run(kv, rows[part], position, ids=ids[part])
            out.append(x.to(self.basis.dtype))
        return torch.cat(out) if out else self.basis.new_zeros(0, self.basis.shape[1])

    def nearest(
        self, coef: torch.Tensor, checked: torch.Tensor, count: int, ranker: Ranker | None = None
    ) -> torch.Tensor:
        """The `count` unchecked tokens whose inputs `coef` (of `ranker`, by default the
        next-token one) predicts nearest the row space (remembered per `coef` when nothing is
        checked: a regression is tried again one position later, and guesses share one)."""
        known = self._nearest.get(id(coef)) if checked.numel() == 0 else None
        if known is not None and len(known[1]) >= count:  # a quick effort keeps fewer
            return known[1][:count]
        score = (ranker or self.ranker).predicted_residual(coef)
        score[checked] = float("inf")
        top = score.topk(min(count, int(score.shape[0]) - int(checked.shape[0])), largest=False)[1]
        if checked.numel() == 0:
            if len(self._nearest) >= NEAREST_KEPT:
                self._nearest.clear()
            self._nearest[id(coef)] = (coef, top)  # the coef kept alive keeps its id unique
        return top

    def check(
        self,
        kv: KV,
        row: int,
        position: int,
        effort: Effort,
        own: torch.Tensor,
        prior: torch.Tensor | None = None,
        sampled: bool = True,
    ) -> Checked:
        """Next tokens after prefix row `row` checked until one fits (see `search`; without
        `sampled`, only its prior stage where there is a prior: `resume` goes on). A token
        whose input the prefix's own inputs (`own`, orthonormal rows) already span is an
        echo, not a new row of the gradient (a Llama repeats its first token's input when
        that token follows it): its residual is set to infinity."""
        evaluate = self.evaluator(kv, row, position)
        if prior is not None and not sampled:
            return self.search_near(evaluate, self.ranker, effort, own, prior)
        return self.search(evaluate, self.ranker, effort, own, prior)

    def resume(
        self, kv: KV, row: int, position: int, effort: Effort, own: torch.Tensor, before: Checked
    ) -> Checked:
        """`check`'s sampled stage after its prior stage `before` found no fit."""
        evaluate = self.evaluator(kv, row, position)
        return self.search_sampled(evaluate, self.ranker, effort, own, before)

    def evaluator(self, kv: KV, row: int, position: int):
        """Module inputs (M, width) of vocabulary indices (M,) after prefix row `row`."""

        def evaluate(ids: torch.Tensor) -> torch.Tensor:
            return self.inputs(kv, ids.new_full(ids.shape, row), position, self.vocab[ids])

        return evaluate

    def search(
        self,
        evaluate,
        ranker: Ranker,
        effort: Effort,
        own: torch.Tensor,
        prior: torch.Tensor | None = None,
    ) -> Checked:
        """Tokens (vocabulary indices) whose inputs `evaluate(indices)` are checked until one
        fits: the prior stage where there is a `prior` (`search_near`), then the sampled one
        (`search_sampled`)."""
        checked = Checked(effort.sample[:0], self.basis.new_zeros(0), prior)
        if prior is not None:
            checked = self.search_near(evaluate, ranker, effort, own, prior)
            if bool(effort.fits(checked.residual).any()):
                return checked
        return self.search_sampled(evaluate, ranker, effort, own, checked)

    def search_near(
        self, evaluate, ranker: Ranker, effort: Effort, own: torch.Tensor, prior: torch.Tensor
    ) -> Checked:
        """The `prior_count` tokens that `prior` (a regression fitted before) puts nearest the
        row space: a fraction of the sample's cost where the prior nearly fits
        (docs/span-method.md, "The screen"); `search_sampled` refits it if none fits."""
        index = self.nearest(prior, effort.sample[:0], effort.prior_count, ranker)
        x = evaluate(index)
        return Checked(index, self.novel_residual(x, own), prior, inputs=x)

    def search_sampled(
        self, evaluate, ranker: Ranker, effort: Effort, own: torch.Tensor, before: Checked
    ) -> Checked:
        """After `before`: the model's guesses and the `known` tokens (`Effort.listed`), then
        the prior regression of `before` refitted on all checked so far (`refit_prior`), then
        the `sample` and `count` doubling each round, led by `ranker`'s regression refitted on
        the sample and the rounds, until one fits. A batch repeats its tokens, and a
        regression can rank a repeat tens of thousands deep (SmolLM2 attn_output@5: " ,"
        23,502nd-34,266th), so the known ones come before the sample."""
        for listed in effort.listed():
            listed = listed[~torch.isin(listed, before.index)]
            if listed.numel() == 0:
                continue
            before = self._add(before, listed, evaluate(listed), own)
            if bool(effort.fits(before.residual).any()):
                return before
        if before.inputs is not None:
            before = self.refit_prior(evaluate, ranker, effort, own, before)
            if bool(effort.fits(before.residual).any()):
                return before
        index = effort.sample[~torch.isin(effort.sample, before.index)]
        if index.numel() == 0:  # the prior stage checked the whole sample (a small vocabulary)
            return before
        x = evaluate(index)
        residual = self.novel_residual(x, own)
        coef = before.coef
        for k in range(effort.rounds):  # at least one round: a sample token's fit can be an echo
            coef = ranker.fit(index, x)
            top = self.nearest(coef, torch.cat([before.index, index]), effort.count << k, ranker)
            if top.numel() == 0:
                break
            new = evaluate(top)
            index, x = torch.cat([index, top]), torch.cat([x, new])
            residual = torch.cat([residual, self.novel_residual(new, own)])
            if bool(effort.fits(residual).any()):
                break
        index = torch.cat([before.index, index])
        return Checked(index, torch.cat([before.residual, residual]), coef)

    def refit_prior(
        self, evaluate, ranker: Ranker, effort: Effort, own: torch.Tensor, before: Checked
    ) -> Checked:
        """`rounds` rounds of `count` tokens, doubling each round, that the prior regression
        (`before.coef`), refitted on every token checked so far and pulled towards itself,
        puts nearest the row space, until one fits."""
        prior, found = before.coef, before
        for k in range(effort.rounds):
            coef = ranker.fit(found.index, found.inputs, toward=prior)
            top = self.nearest(coef, found.index, effort.count << k, ranker)
            found = replace(self._add(found, top, evaluate(top), own), coef=coef)
            if bool(effort.fits(found.residual).any()):
                break
        return replace(found, inputs=None)

    def _add(
        self, before: Checked, index: torch.Tensor, x: torch.Tensor, own: torch.Tensor
    ) -> Checked:
        """`before` and tokens `index` with inputs `x` (kept where `before` keeps its own)."""
        inputs = None if before.inputs is None else torch.cat([before.inputs, x])
        residual = torch.cat([before.residual, self.novel_residual(x, own)])
        return replace(
            before, index=torch.cat([before.index, index]), residual=residual, inputs=inputs
        )

    def novel_residual(self, x: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """The relative residual of inputs `x` against the row space, infinite for echoes of
        the prefix's own inputs `own` (see `check`)."""
        residual = relative_residual(x, self.basis)
        if own.shape[0]:
            echo = relative_residual(x, own) <= self.tol
            residual = residual.masked_fill(echo, float("inf"))
        return residual

    @torch.no_grad()
    def extend(
        self, kv: KV, rows: torch.Tensor, position: int, ids: torch.Tensor
    ) -> tuple[torch.Tensor, KV]:
        """Module inputs (M, width) and grown caches of prefix rows `rows` + tokens `ids`."""
        xs, parts = [], []
        for start in range(0, int(rows.shape[0]), self.forward_batch):
            part = slice(start, start + self.forward_batch)
            x, grown = self.runner.run(kv, rows[part], position, ids=ids[part])
            xs.append(x)
            parts.append(grown)
        return torch.cat(xs), concat(parts)
