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
every pair at once, and each pool token's nearest first tokens are checked exactly, once, when
the search is built: a regression fitted per second token on a few thousand checked pairs (the
search used before) ranked true first tokens up to 6,214th, the shared one, fitted on eight
tokens' pairs, up to 67th. Where the repair still misses a first token, the pool's second
tokens without one are taken in an order, and the best get more of their nearest first tokens
checked: their second-best rank over the stand-ins (no one stand-in ranks every sentence's
second token well) of how much of their input lies in the part of the row space the recovered
sentences' inputs (`own`) leave unexplained, against how much lies outside it.

The stand-ins are common word tokens: a special token or a rare fragment in front moves every
second token's input away. Measurements: docs/span-measurements.md.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.causal.prefix import KV, concat, select
from gradaudit.attacks.causal.screen import (
    Effort,
    Ranker,
    Screen,
    orthonormal_rows,
    relative_residual,
)

POOL = 4  # second tokens in the pool, per dimension of the row space
COMMON_FIRSTS = 2048  # first tokens the shared regression is fitted on, with the sample
SHARED_SECONDS = 8  # pool tokens whose pairs with the sample fit the shared regression
PRIOR_FIRSTS = 256  # first tokens the shared regression puts nearest, checked per second
DEEP_SECONDS = 2  # pool tokens without a first token checked deeper if wanted, per row
# of the row space left unexplained (the lost sentences' tokens lead the order, at most one
# of them second: CoLA dev 0-7's " you" came 10th at query@5, B = 8), 8 at least
DEEP_FIRSTS = 2048  # ... that many first tokens the shared regression puts nearest
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
        self.ranker = Ranker(torch.cat([x, torch.ones_like(x[:, :1])], 1), screen.basis)

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
    position-0 caches, the second tokens nearest the row space after the stand-ins and their
    inputs there are computed once, for the growth's search and the repair's."""

    def __init__(self, screen: Screen, effort: Effort, stand_ins: torch.Tensor) -> None:
        self.screen = screen
        self.firsts = FirstPositions(screen)
        none = screen.basis.new_zeros(0, screen.basis.shape[1])
        ranks = []  # per stand-in: every token's rank among those checked after it
        for stand_in in stand_ins.tolist():
            checked = screen.check(self.firsts.stand_in(stand_in), 0, 1, effort, none)
            rank = torch.full_like(screen.vocab, len(screen.vocab))
            order = checked.index[checked.residual.argsort()]
            rank[order] = torch.arange(len(order), device=order.device)
            ranks.append(rank)
        agreed = second_best(torch.stack(ranks))
        count = min(POOL * int(screen.basis.shape[0]), int((agreed < len(agreed)).sum()))
        self.seconds = agreed.argsort(stable=True)[:count]  # vocabulary indices
        ids = screen.vocab[self.seconds]
        after = [
            screen.inputs(self.firsts.stand_in(s), torch.zeros_like(ids), 1, ids)
            for s in stand_ins.tolist()
        ]
        self.after = torch.stack(after)  # (stand-ins, seconds, width)
        basis = screen.basis
        self.outside = (self.after - (self.after @ basis.T) @ basis).norm(dim=-1)
        common = torch.arange(min(COMMON_FIRSTS, len(screen.vocab)), device=ids.device)
        self.fits = effort.fits
        self.ranked = self._ranked_firsts(stand_ins, torch.cat([common, effort.sample]).unique())
        self.near = self._near_pairs()

    def _ranked_firsts(self, stand_ins: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Per pool token, the `DEEP_FIRSTS` first tokens (vocabulary indices, best first)
        that one regression shared by all second tokens puts nearest the row space:
        x(first, second) ~ A f(first) + c(second), A fitted on `SHARED_SECONDS` pool tokens'
        pairs with the sample, each centred (the same first tokens for all: their mean
        centred input is fitted), c(second) from its inputs after the stand-ins. Within a
        second token it ranked the true first 0-67th (SmolLM2 query@5); each token's own
        regression fitted on the sample ranked it up to 6,214th."""
        screen, ranker = self.screen, self.firsts.ranker
        step = max(1, len(self.seconds) // SHARED_SECONDS)
        centred = []
        for second in self.seconds[::step][:SHARED_SECONDS].tolist():
            x = self.firsts.inputs(sample, screen.vocab[second])
            centred.append(x - x.mean(0))
        shared = ranker.fit(sample, torch.stack(centred).mean(0))
        offsets = (self.after - (ranker.features[stand_ins] @ shared)[:, None]).mean(0)
        y, c, basis = ranker.single @ shared.float(), offsets.float(), screen.basis.float()
        yb, cb = y @ basis.T, c @ basis.T
        total = y.square().sum(1)[:, None] + 2 * y @ c.T + c.square().sum(1)
        inside = yb.square().sum(1)[:, None] + 2 * yb @ cb.T + cb.square().sum(1)
        outside = (total - inside).clamp_min(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
        deep = min(DEEP_FIRSTS, int(y.shape[0]))
        return outside.topk(deep, dim=0, largest=False).indices.T

    def _near_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pairs (first token's vocabulary index, second's pool position) whose input lies
        in the row space, among each pool token's `PRIOR_FIRSTS` best-ranked first tokens,
        and their inputs (kept: every search tests them against its own explained rows)."""
        count = min(PRIOR_FIRSTS, int(self.ranked.shape[1]))
        firsts = self.ranked[:, :count].reshape(-1)
        positions = torch.arange(len(self.seconds), device=firsts.device).repeat_interleave(count)
        x = self.firsts.inputs(firsts, self.screen.vocab[self.seconds[positions]])
        fit = self.fits(relative_residual(x, self.screen.basis))
        return firsts[fit], positions[fit], x[fit]

    def order(self, own: torch.Tensor) -> torch.Tensor:
        """The pool's second tokens (positions in `seconds`), best first: by the second-best
        rank over the stand-ins of how much more of their input lies in the row space's part
        that `own` (orthonormal rows) leaves than outside the row space: |in it| / |in it or
        outside|."""
        left = self.screen.basis
        if own.shape[0]:
            left = orthonormal_rows(left - (left @ own.T) @ own)
        inside = (self.after @ left.T).norm(dim=-1)
        share = inside / torch.hypot(inside, self.outside).clamp_min(1e-30)
        agreed = second_best((-share).argsort(1).argsort(1))
        return agreed.argsort(stable=True)

    def first_tokens(self, own: torch.Tensor, wanted: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary indices of first tokens after which some second token's input is a new
        row of the gradient (in the row space, not spanned by `own`), best fit first, and
        their residuals: the pairs the shared regression found (`_near_pairs`), then, with
        fewer than `wanted` found, the best-ordered pool tokens without one (`DEEP_SECONDS`),
        each with its `DEEP_FIRSTS` nearest first tokens, until enough are found."""
        screen, firsts, fits = self.screen, self.firsts, self.fits
        found: dict[int, float] = {}

        def record(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            residual = screen.novel_residual(x, own)
            for i, r in zip(index.tolist(), residual.tolist()):
                if fits(r):
                    found[i] = min(r, found.get(i, r))
            return fits(residual)

        near, at, x = self.near  # those that are new rows, not echoes of `own`
        matched = set(at[record(near, x)].tolist())
        if len(found) < wanted:
            left = [p for p in self.order(own).tolist() if p not in matched]
            unexplained = int(screen.basis.shape[0]) - int(own.shape[0])
            for position in left[: max(8, DEEP_SECONDS * unexplained)]:
                deeper = self.ranked[position, PRIOR_FIRSTS:]
                record(deeper, firsts.inputs(deeper, screen.vocab[self.seconds[position]]))
                if len(found) >= wanted:
                    break
        best = sorted(found, key=found.__getitem__)
        index = torch.tensor(best, dtype=torch.long, device=screen.vocab.device)
        residual = torch.tensor([found[i] for i in best], dtype=screen.basis.dtype)
        return index, residual.to(index.device)
