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
"""

from __future__ import annotations

import torch

from gradaudit.attacks.causal.prefix import KV, concat, select
from gradaudit.attacks.causal.screen import Effort, Ranker, Screen


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
        keys_values = [t.reshape(len(vocab), -1) for e in self.kv if e is not None for t in e]
        x = torch.cat(keys_values, 1).to(screen.basis.dtype)
        self.ranker = Ranker(torch.cat([x, torch.ones_like(x[:, :1])], 1), screen.basis)

    def inputs(self, first: torch.Tensor, second: int) -> torch.Tensor:
        """Module inputs (M, width) at position 1 of the pairs (vocab[first[i]], second)."""
        screen = self.screen
        return screen.inputs(self.kv, first, 1, torch.full_like(first, second))

    def stand_in(self, index: int) -> KV:
        """The cache of one token (vocabulary index) at position 0."""
        return select(self.kv, torch.tensor([index], device=self.screen.vocab.device))


def first_tokens(screen: Screen, effort: Effort, stand_ins: int, most: int) -> torch.Tensor:
    """Vocabulary indices of first tokens after which some second token's input lies in the
    row space, best fit first, at most `most` of them (see the module docstring). Second
    tokens are tried in the order `stand_ins` stand-in first tokens (the lowest ids) rank
    them, as many as the row space's rank (every token of the batch may come near it); then
    the best-ranked ones without a first token, one per first token still missing, are checked
    against every first token. `effort` as in `Screen.search`."""
    fits = effort.fits
    none = screen.basis.new_zeros(0, screen.basis.shape[1])
    firsts = FirstPositions(screen)
    near = torch.full_like(screen.vocab, float("inf"), dtype=screen.basis.dtype)
    for stand_in in range(stand_ins):
        checked = screen.check(firsts.stand_in(stand_in), 0, 1, effort, none)
        near[checked.index] = torch.minimum(near[checked.index], checked.residual)
    found: dict[int, float] = {}
    unmatched = []  # second tokens no first token was found for, best-ranked first

    def record(index: torch.Tensor, residual: torch.Tensor) -> bool:
        for i, r in zip(index.tolist(), residual.tolist()):
            if fits(r):
                found[i] = min(r, found.get(i, r))
        return bool(fits(residual).any())

    for second in near.argsort()[: screen.basis.shape[0]].tolist():
        token = int(screen.vocab[second])

        def evaluate(ids: torch.Tensor, token: int = token) -> torch.Tensor:
            return firsts.inputs(ids, token)

        checked = screen.search(evaluate, firsts.ranker, effort, none)
        if not record(checked.index, checked.residual):
            unmatched.append(token)
        if len(found) >= most:  # as many first tokens as sentences
            break
    every = torch.arange(int(screen.vocab.shape[0]), device=screen.vocab.device)
    for token in unmatched[: max(0, most - len(found))]:
        record(every, screen.novel_residual(firsts.inputs(every, token), none))
    best_first = sorted(found, key=found.__getitem__)
    return torch.tensor(best_first, dtype=torch.long, device=screen.vocab.device)
