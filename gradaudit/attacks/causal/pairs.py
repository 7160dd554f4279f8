"""A query module's blind first token, found together with the second.

A query's first position has no row in its gradient (it attends to itself alone), so the first
token shows only through the second position's input, which depends on both. Guessing it from
the commonest tokens fails on real text (on the three data sets about half of all sentences
start with a token past the 1,024 commonest). Instead: second tokens whose input after a
stand-in first token comes near the row space are candidates (they are the batch's own tokens,
seen at other positions); for each, the first token is searched as the screen searches next
tokens with the roles swapped: a regression from every token's own keys and values at position
0 (what position 1 reads of it) to the pair's input, checked exactly where it predicts the row
space. The best-ranked second tokens that still lack a first token get every first token
checked exactly.

The stand-ins are common word tokens: a special token or a rare fragment in front moves every
second token's input away. No one stand-in ranks every sentence's second token well, so a
second token's place is its second-best rank over the stand-ins. What is ranked: how much of
its input lies in the part of the row space the recovered sentences' inputs (`own`) leave
unexplained, against how much lies outside the row space; the batch's other tokens come near
the row space after a stand-in too, but near rows already explained. Every second token
tried also gets the commonest first tokens checked exactly (the regression missed "the" before
" acting"), at about 1.4 s a try against 1.0 s without. Measurements: docs/span-measurements.md.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.causal.prefix import KV, concat, select
from gradaudit.attacks.causal.screen import Effort, Ranker, Screen, orthonormal_rows

SECONDS = 2  # second tokens tried at most, per dimension of the row space
POOL = 4  # second tokens ordered, per dimension of the row space
COMMON_FIRSTS = 2048  # first tokens: 44-47 % are among the 1,024 commonest, 57-70 % of 4,096
FIRST_ROUNDS = 2  # a true pair's first token was found within two (SmolLM2 query@5 and 15)
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

    def inputs(self, first: torch.Tensor, second: int) -> torch.Tensor:
        """Module inputs (M, width) at position 1 of the pairs (vocab[first[i]], second)."""
        screen = self.screen
        return screen.inputs(self.kv, first, 1, torch.full_like(first, second))

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
        # a first token's search: the commonest first tokens and the sample, then the rounds
        sample = torch.cat([common, effort.sample]).unique()
        self.effort = replace(effort, sample=sample, rounds=min(effort.rounds, FIRST_ROUNDS))

    def order(self, own: torch.Tensor) -> torch.Tensor:
        """The second tokens, best first: by the second-best rank over the stand-ins of how
        much more of their input lies in the row space's part that `own` (orthonormal rows)
        leaves than outside the row space: |in it| / |in it or outside|."""
        left = self.screen.basis
        if own.shape[0]:
            left = orthonormal_rows(left - (left @ own.T) @ own)
        inside = (self.after @ left.T).norm(dim=-1)
        share = inside / torch.hypot(inside, self.outside).clamp_min(1e-30)
        agreed = second_best((-share).argsort(1).argsort(1))
        return self.seconds[agreed.argsort(stable=True)]

    def first_tokens(
        self, most: int, own: torch.Tensor, tries: int = SECONDS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary indices of first tokens after which some second token's input is a new
        row of the gradient (in the row space, not spanned by `own`), best fit first, at most
        `most` of them, and their residuals. Second tokens are tried in their `order`, `tries`
        per dimension of the row space; then the best-ordered ones without a first token, one
        per first token still missing, are checked against every first token."""
        screen, firsts, fits = self.screen, self.firsts, self.effort.fits
        seconds = self.order(own)[: tries * int(screen.basis.shape[0])]
        found: dict[int, float] = {}
        unmatched = []  # second tokens no first token was found for, best-ordered first

        def record(index: torch.Tensor, residual: torch.Tensor) -> bool:
            for i, r in zip(index.tolist(), residual.tolist()):
                if fits(r):
                    found[i] = min(r, found.get(i, r))
            return bool(fits(residual).any())

        for second in seconds.tolist():
            token = int(screen.vocab[second])

            def evaluate(ids: torch.Tensor, token: int = token) -> torch.Tensor:
                return firsts.inputs(ids, token)

            checked = screen.search(evaluate, firsts.ranker, self.effort, own)
            if not record(checked.index, checked.residual):
                unmatched.append(token)
            if len(found) >= most:  # as many first tokens as sentences
                break
        every = torch.arange(int(screen.vocab.shape[0]), device=screen.vocab.device)
        for token in unmatched[: max(0, most - len(found))]:
            record(every, screen.novel_residual(firsts.inputs(every, token), own))
        best = sorted(found, key=found.__getitem__)
        index = torch.tensor(best, dtype=torch.long, device=screen.vocab.device)
        residual = torch.tensor([found[i] for i in best], dtype=screen.basis.dtype)
        return index, residual.to(index.device)
