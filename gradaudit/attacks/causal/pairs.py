"""A query module's blind first token, found together with the second.

A query's first position has no row in its gradient (it attends to itself alone), so the first
token shows only through the second position's input, which depends on both. Guessing it from
the commonest tokens fails on real text (on the three data sets about half of all sentences
start with a token past the 1,024 commonest). Instead: second tokens whose input after a
stand-in first token comes near the row space make a pool (they are the batch's own tokens,
seen at other positions), and the first token is searched behind each as the screen searches
next tokens with the roles swapped: a regression from every token's own keys and values at
position 0 (what position 1 reads of it) to the pair's input, checked exactly where it predicts
the row space.

One regression shared by the whole pool (each second token only shifts the prediction) ranks
every pair at once; each pool token's nearest first tokens are checked exactly when the search
is built, in rounds, its shift refitted between them on the pairs checked. A regression fitted
per second token (the search used before) ranked true first tokens up to 6,214th, the shared
one up to 67th for word tokens; for fragments it ranked them 465th-5,627th, refitted 26th-116th
for two of three ("rows" of "th rows" stays thousands deep). Where the repair still
misses a first token, the pool is widened once by the vocabulary's second tokens whose input
lies most in the part of the row space the recovered sentences' inputs (`own`) leave
unexplained (a split first word's fragment second token, "lov ingly", lies far from the row
space after any stand-in and misses the pool), and the pool's tokens without a first token
are searched in that order (their second-best rank over the stand-ins: no one stand-in ranks
every sentence's second token well), the best ones deeper.

The stand-ins are common word tokens: a special token or a rare fragment in front moves every
second token's input away. Measurements: docs/span-measurements.md.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.causal.prefix import KV, concat, select
from gradaudit.attacks.causal.screen import (
    Effort,
    Screen,
    orthonormal_rows,
    outside_norm,
    relative_residual,
)

POOL = 4  # second tokens in the pool, per dimension of the row space
COMMON_FIRSTS = 2048  # first tokens the shared regression is fitted on, with the sample
SHARED_SECONDS = 8  # pool tokens whose pairs with the sample fit the shared regression
ROUND_FIRSTS = 64  # first tokens checked per second token in a search's first round
PRIOR_FIRSTS = 256  # first tokens checked per pool token (when the pool is built or widened)
WIDE_SECONDS = 1024  # second tokens the pool is widened by when the repair wants a first
DEEP_SECONDS = 2  # pool tokens without a first token checked deeper if wanted, per row
# of the row space left unexplained (the lost sentences' tokens lead the order, at most one
# of them second: CoLA dev 0-7's " you" came 10th at query@5, B = 8), 8 at least
DEEP_FIRSTS = 2048  # ... until that many first tokens are checked
# Deep tokens searched by their own regression, after the shared one, best-ordered first: each
# costs a ranking of the vocabulary (query@5, Rotten Tomatoes 0-7: the first repair's search
# took 355 s with every deep token and three rounds each, 121 s without); at query@1 the finds
# came 4th, 7th and 11th, each in one round of `ROUND_FIRSTS` (the pair sample alone: none)
OWN_SECONDS = 16
CHECKS_PER_BATCH = 16384  # pairs checked between looks at whether enough are found
SCORED_SECONDS = 128  # pool tokens whose pairs with the vocabulary are scored at once
PAIR_FEATURES = 1024  # the first-token regression's features, projected down to this many


class FirstPositions:
    """Every token's cache at position 0, and the inputs of pairs (first, second) from it."""

    def __init__(self, screen: Screen) -> None:
        self.screen = screen
        vocab, runner, caches = screen.vocab, screen.runner, []
        with torch.no_grad():
            for start in range(0, int(vocab.shape[0]), screen.forward_batch):
                ids = vocab[start : start + screen.forward_batch]
                caches.append(runner.run(runner.empty(), torch.zeros_like(ids), 0, ids=ids)[1])
        self.kv = concat(caches)
        parts = [t.reshape(len(vocab), -1) for e in self.kv if e is not None for t in e]
        x = features(parts).to(screen.basis.dtype)
        self.ranker = screen.ranker_of(x)

    def inputs(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Module inputs (M, width) at position 1 of the pairs (vocab[first[i]], second[i]),
        `second` token ids (M,) or one for all (a 0-d tensor)."""
        return self.screen.inputs(self.kv, first, 1, second.expand_as(first))

    def stand_in(self, index: int) -> KV:
        """The cache of one token (vocabulary index) at position 0."""
        return select(self.kv, torch.tensor([index], device=self.screen.vocab.device))


def features(parts: list[torch.Tensor]) -> torch.Tensor:
    """The first tokens' keys and values `parts` side by side, or, wider than
    `PAIR_FEATURES` (384 per layer on SmolLM2), their random projection to that many: the
    regression's fit and ranking cost grow with its features."""
    width = sum(int(p.shape[1]) for p in parts)
    if width <= PAIR_FEATURES:
        return torch.cat(parts, 1)
    seeded = torch.Generator().manual_seed(0)
    out = parts[0].new_zeros(parts[0].shape[0], PAIR_FEATURES)
    for p in parts:
        gauss = torch.randn(p.shape[1], PAIR_FEATURES, generator=seeded) / PAIR_FEATURES**0.5
        out += p @ gauss.to(p)
    return out


def stand_in_tokens(
    tokenizer: PreTrainedTokenizerBase, vocab: torch.Tensor, count: int, among: int
) -> torch.Tensor:
    """Vocabulary indices of `count` stand-in first tokens: word tokens (two letters or more)
    spread evenly over the `among` lowest ids, or the lowest ids where there are too few."""
    words = [
        i
        for i, t in enumerate(vocab[:among].tolist())
        if len(w := tokenizer.decode([t]).strip()) >= 2 and w.isalpha()
    ]
    if len(words) < count:
        words = list(range(min(count, len(vocab))))
    step = len(words) / count
    return torch.tensor([words[int(k * step)] for k in range(count)], device=vocab.device)


def second_best(ranks: torch.Tensor) -> torch.Tensor:
    """Per token, its second-best rank over the stand-ins (ranks: stand-ins x tokens): one
    stand-in near the true first token can rank its second token high, but so can it a stray
    token; two agreeing is the better order."""
    return ranks.sort(0).values[min(1, len(ranks) - 1)]


class PairSearch:
    """First tokens found with second tokens (see the module docstring): the vocabulary's
    position-0 caches, the pool of second tokens with their inputs after the stand-ins, the
    shared regression and every pair checked so far are kept, for the growth's search and
    each of the repair's."""

    def __init__(self, screen: Screen, effort: Effort, stand_ins: torch.Tensor) -> None:
        self.screen, self.stand_ins, self.fits = screen, stand_ins, effort.fits
        self.sample = effort.sample  # first tokens a deep token's own regression is fitted on
        self.firsts = FirstPositions(screen)
        no_rows = screen.basis.new_zeros(0, screen.basis.shape[1])
        ranks = []  # per stand-in: every token's rank among those checked after it
        for stand_in in stand_ins.tolist():
            checked = screen.check(self.firsts.stand_in(stand_in), 0, 1, effort, no_rows)
            rank = torch.full_like(screen.vocab, len(screen.vocab))
            order = checked.index[checked.residual.argsort()]
            rank[order] = torch.arange(len(order), device=order.device)
            ranks.append(rank)
        agreed = second_best(torch.stack(ranks))
        count = min(int(POOL * int(screen.basis.shape[0])), int((agreed < len(agreed)).sum()))
        pool = agreed.argsort(stable=True)[:count]  # vocabulary indices
        common = torch.arange(min(COMMON_FIRSTS, len(screen.vocab)), device=pool.device)
        shared = self._shared_regression(pool, torch.cat([common, effort.sample]).unique())
        basis = screen.basis.float()
        self.shared = shared
        self.predicted = self.firsts.ranker.single @ shared.float()  # A f(first), (V, width)
        self.predicted_in = self.predicted @ basis.T
        self.predicted_norms = (self.predicted.square().sum(1), self.predicted_in.square().sum(1))
        no_ids = pool[:0]
        self.seconds = no_ids
        self.after = screen.basis.new_zeros(len(stand_ins), 0, screen.basis.shape[1])
        self.outside = screen.basis.new_zeros(len(stand_ins), 0)
        self.offset = basis.new_zeros(0, basis.shape[1])  # c(second) from the stand-ins
        self.drift = basis.new_zeros(0, basis.shape[1])  # sum over checked pairs of x - A f
        self.checked = torch.zeros(0, len(screen.vocab), dtype=torch.bool, device=pool.device)
        self.near = (no_ids, no_ids, no_rows)  # pairs in the row space: first, position, x
        self._add(pool)
        self.built = len(pool)  # pool positions from here on were added by `_widen`
        self._search(torch.arange(len(pool), device=pool.device), PRIOR_FIRSTS)

    def _shared_regression(self, pool: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """A of x(first, second) ~ A f(first) + c(second): one ridge fit on `SHARED_SECONDS`
        pool tokens' pairs with the sample, each centred (the same first tokens for all: their
        mean centred input is fitted). Within a second token it ranked the true first 0-67th
        (SmolLM2 query@5); each token's own regression fitted on the sample, up to 6,214th."""
        screen = self.screen
        step = max(1, len(pool) // SHARED_SECONDS)
        centred = []
        for second in pool[::step][:SHARED_SECONDS].tolist():
            x = self.firsts.inputs(sample, screen.vocab[second])
            centred.append(x - x.mean(0))
        return self.firsts.ranker.fit(sample, torch.stack(centred).mean(0))

    def _add(self, seconds: torch.Tensor) -> None:
        """Second tokens (vocabulary indices) joined to the pool: their inputs after the
        stand-ins, and from them c(second), their first guess of the regression's offset."""
        screen, ranker = self.screen, self.firsts.ranker
        ids = screen.vocab[seconds]
        after = torch.stack(
            [
                screen.inputs(self.firsts.stand_in(s), torch.zeros_like(ids), 1, ids)
                for s in self.stand_ins.tolist()
            ]
        )
        basis = screen.basis
        offset = (after - (ranker.features[self.stand_ins] @ self.shared)[:, None]).mean(0)
        self.seconds = torch.cat([self.seconds, seconds])
        self.after = torch.cat([self.after, after], 1)
        self.outside = torch.cat([self.outside, outside_norm(after, basis)], 1)
        self.offset = torch.cat([self.offset, offset.float()])
        self.drift = torch.cat([self.drift, torch.zeros_like(offset, dtype=self.drift.dtype)])
        fresh = self.checked.new_zeros(len(seconds), self.checked.shape[1])
        self.checked = torch.cat([self.checked, fresh])

    def _search(self, positions: torch.Tensor, upto: int) -> tuple[torch.Tensor, ...]:
        """Each pool position's first tokens checked exactly until `upto` are, in rounds as
        large as those before (at least `ROUND_FIRSTS`), nearest by the shared regression with
        the offset c(second) refitted between rounds on the pairs checked (real first tokens
        in front, not stand-ins: it moved two fragments' true first tokens from 465th and 597th
        to 26th-116th, SmolLM2 query@5); the pairs found in the row space (see `_check`)."""
        found = []
        while True:
            done = self.checked[positions].sum(1)
            size = torch.minimum(done.clamp_min(ROUND_FIRSTS), upto - done)
            size = torch.minimum(size, len(self.screen.vocab) - done)
            live = size > 0
            if not bool(live.any()):
                break
            positions, size = positions[live], size[live]
            most = int(size.max())
            top = torch.cat(  # scored a slice of positions at a time: (V, n) floats each
                [
                    self._scores(part).topk(most, dim=0, largest=False).indices
                    for part in positions.split(SCORED_SECONDS)
                ],
                1,
            )
            take = torch.arange(top.shape[0], device=top.device)[:, None] < size
            found.append(self._check(positions.repeat_interleave(size), top.T[take.T])[0])
        return self._joined(found)

    def _search_own(self, position: int) -> tuple[torch.Tensor, ...]:
        """The pairs found (see `_check`) for the pool token at `position` among its pairs
        with the sample and then the `ROUND_FIRSTS` first tokens its own regression, fitted on
        those pairs, puts nearest. Where the first token reaches the second through one or two
        layers, the shared regression predicts every pair near the row space: at SmolLM2
        query@1 it ranked the true first tokens behind " '", " us" and " l" 48,456th,
        17,281st and 5,941st, their own regressions 0th."""
        at = torch.tensor([position], device=self.sample.device)
        index = self.sample[~self.checked[position, self.sample]]
        if index.numel() == 0:  # the sample checked already: no pairs to fit on
            return self._joined([])
        pairs, x = self._check(at.expand_as(index), index)
        if pairs[0].numel():
            return pairs
        ranker = self.firsts.ranker
        done = self.checked[position].nonzero()[:, 0]
        top = self.screen.nearest(ranker.fit(index, x), done, ROUND_FIRSTS, ranker)
        return self._check(at.expand_as(top), top)[0] if top.numel() else pairs

    def _check(
        self, at: torch.Tensor, firsts: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The pairs (first tokens `firsts`, pool tokens at positions `at`) checked exactly:
        those in the row space (first, position, input), which are added to `near`, and every
        pair's input. Each pair is marked checked and its drift from the shared regression
        recorded."""
        x = self.firsts.inputs(firsts, self.screen.vocab[self.seconds[at]])
        self.drift.index_add_(0, at, x.float() - self.predicted[firsts])
        self.checked[at, firsts] = True
        fit = self.fits(relative_residual(x, self.screen.basis))
        pairs = (firsts[fit], at[fit], x[fit])
        self.near = tuple(torch.cat([a, b]) for a, b in zip(self.near, pairs))
        return pairs, x

    def _joined(self, found: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """Pairs found in several checks, joined (none: empty)."""
        if not found:
            return tuple(t[:0] for t in self.near)
        return tuple(torch.cat(parts) for parts in zip(*found))

    def _offsets(self, positions: torch.Tensor) -> torch.Tensor:
        """c(second) of the pool tokens at `positions` (n, width): the mean drift of their
        pairs checked, or, before any, the stand-ins' estimate."""
        count = self.checked[positions].sum(1, keepdim=True)
        refitted = self.drift[positions] / count.clamp_min(1)
        return torch.where(count > 0, refitted, self.offset[positions])

    def _scores(self, positions: torch.Tensor) -> torch.Tensor:
        """(V, n): how much of the predicted input of each pair (first token, pool token at
        `positions`) lies outside the row space, relative; pairs checked already: infinite."""
        c = self._offsets(positions)
        c_in = c @ self.screen.basis.float().T
        (y, y_in), (y_sq, y_in_sq) = (self.predicted, self.predicted_in), self.predicted_norms
        total = y_sq[:, None] + 2 * y @ c.T + c.square().sum(1)
        inside = y_in_sq[:, None] + 2 * y_in @ c_in.T + c_in.square().sum(1)
        outside = (total - inside).clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
        return outside.masked_fill(self.checked[positions].T, float("inf"))

    def _left(self, own: torch.Tensor) -> torch.Tensor:
        """Orthonormal rows of the row space's part that `own` leaves unexplained."""
        basis = self.screen.basis
        return orthonormal_rows(basis - (basis @ own.T) @ own) if own.shape[0] else basis

    def _widen(self, own: torch.Tensor) -> None:
        """`WIDE_SECONDS` more second tokens in the pool: the vocabulary's whose input after
        the first stand-in has the largest share in the part of the row space `own` leaves
        unexplained (see `order`). A sentence whose first word is split ("lov ingly", "th
        rows") has a fragment second, which after a word stand-in comes far from the row
        space: outside the pool, 229th-489th by this share on the whole vocabulary."""
        screen, vocab = self.screen, self.screen.vocab
        room = len(vocab) - len(self.seconds)
        if room <= 0:
            return
        stand_in = self.firsts.stand_in(int(self.stand_ins[0]))
        x = screen.inputs(stand_in, torch.zeros_like(vocab), 1, vocab)
        share = unexplained_share(x, self._left(own), outside_norm(x, screen.basis))
        share[self.seconds] = -1.0
        self._add(share.topk(min(WIDE_SECONDS, room)).indices)

    def order(self, own: torch.Tensor) -> torch.Tensor:
        """The pool's second tokens (positions in `seconds`), best first: by the second-best
        rank over the stand-ins of `unexplained_share` of their inputs after them."""
        share = unexplained_share(self.after, self._left(own), self.outside)
        agreed = second_best((-share).argsort(1).argsort(1))
        return agreed.argsort(stable=True)

    def first_tokens(self, own: torch.Tensor, wanted: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary indices of first tokens after which some second token's input is a new
        row of the gradient (in the row space, not spanned by `own`), best fit first, and
        their residuals: the pairs found so far, then, with fewer than `wanted`, the pool's
        best-ordered tokens without one (`DEEP_SECONDS` per unexplained row, 8 at least)
        searched to `DEEP_FIRSTS` first tokens (the best `OWN_SECONDS` of those still
        without one by their own regressions, `_search_own`), then the pool widened (`_widen`)
        and its new tokens searched in order, each to `PRIOR_FIRSTS`, the best deeper, until
        enough are found. The pool as built comes first: the widened tokens crowd the order
        (CoLA dev 0-7's " you", behind the lost "If", came 816th of 1,324 at query@5 in a
        probe, and that sentence was lost; 10th of the 300 as built)."""
        screen, fits = self.screen, self.fits
        found: dict[int, float] = {}

        def record(index: torch.Tensor, at: torch.Tensor, x: torch.Tensor) -> set[int]:
            residual = screen.novel_residual(x, own)
            for i, r in zip(index.tolist(), residual.tolist()):
                if fits(r):
                    found[i] = min(r, found.get(i, r))
            return set(at[fits(residual)].tolist())

        matched = record(*self.near)  # those that are new rows, not echoes of `own`

        def search(positions: list[int], upto: int) -> None:
            batch = max(1, CHECKS_PER_BATCH // max(1, upto))
            for start in range(0, len(positions), batch):
                if len(found) >= wanted:
                    return
                part = torch.tensor(positions[start : start + batch], device=device)
                record(*self._search(part, upto))

        device, unexplained = self.seconds.device, int(screen.basis.shape[0]) - int(own.shape[0])
        for widened in (False, True):  # the pool as built, then the tokens it is widened by
            if len(found) >= wanted:
                break
            if widened and len(self.seconds) == self.built:  # widened once
                self._widen(own)
            left = [
                p
                for p in self.order(own).tolist()
                if p not in matched and (p >= self.built) == widened
            ]
            search(left if widened else [], PRIOR_FIRSTS)
            deep = left[: max(8, DEEP_SECONDS * unexplained)]
            search(deep, DEEP_FIRSTS)
            paired = set(self.near[1].tolist())
            for p in [p for p in deep if p not in paired][:OWN_SECONDS]:  # their own
                if len(found) >= wanted:
                    break
                record(*self._search_own(p))
        best = sorted(found, key=found.__getitem__)
        index = torch.tensor(best, dtype=torch.long, device=screen.vocab.device)
        residual = torch.tensor([found[i] for i in best], dtype=screen.basis.dtype)
        return index, residual.to(index.device)


def unexplained_share(x: torch.Tensor, left: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """|part of inputs `x` in `left`| / |that or the part `outside` the row space| per row: a
    lost sentence's token, after a wrong first token, still lies more in what the recovered
    sentences leave unexplained than in their part."""
    inside = (x @ left.T).norm(dim=-1)
    return inside / torch.hypot(inside, outside).clamp_min(1e-30)
