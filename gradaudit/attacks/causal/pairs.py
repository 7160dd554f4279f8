"""A query module's blind first token, found together with the second.

A query's first position has no row in its gradient (it attends to itself alone), so the first
token shows only through the second position's input, which depends on both. Guessing it from
the commonest tokens fails on real text (on the three data sets about half of all sentences
start with a token past the 1,024 commonest). Instead: second tokens whose input after a
stand-in first token comes near the row space are candidates (they are the batch's own tokens,
seen at other positions); for each, the first token is searched as the screen searches next
tokens with the roles swapped: a regression from every token's own first-position input to the
pair's second-position input, checked exactly where it predicts the row space.
"""

from __future__ import annotations

import torch

from gradaudit.attacks.causal.screen import Ranker, Screen


def pair_inputs(screen: Screen, first: torch.Tensor, second: int) -> torch.Tensor:
    """Module inputs (M, width) at position 1 of the pairs (first[i], second)."""
    runner, out = screen.runner, []
    with torch.no_grad():
        for start in range(0, int(first.shape[0]), screen.forward_batch):
            ids = first[start : start + screen.forward_batch]
            rows = torch.arange(int(ids.shape[0]), device=ids.device)
            _, kv = runner.run(runner.empty(), rows, 0, ids=ids)
            x, _ = runner.run(kv, rows, 1, ids=torch.full_like(ids, second))
            out.append(x.to(screen.basis.dtype))
    return torch.cat(out)


def first_position_ranker(screen: Screen) -> Ranker:
    """The regression over every token's own keys and values at position 0 (the feature
    module's cache): what a second position reads of the first."""
    vocab, runner, parts = screen.vocab, screen.feature_runner, []
    with torch.no_grad():
        for start in range(0, int(vocab.shape[0]), screen.forward_batch):
            ids = vocab[start : start + screen.forward_batch]
            rows = torch.zeros_like(ids)
            _, kv = runner.run(runner.empty(), rows, 0, ids=ids)
            cached = [t.reshape(len(ids), -1) for e in kv if e is not None for t in e]
            parts.append(torch.cat(cached, 1).to(screen.basis.dtype))
    x = torch.cat(parts)
    return Ranker(torch.cat([x, torch.ones_like(x[:, :1])], 1), screen.basis)


def first_tokens(
    screen: Screen,
    sample: torch.Tensor,
    stand_ins: int,
    count: int,
    rounds: int,
    tol: float,
    most: int,
) -> torch.Tensor:
    """Vocabulary indices of first tokens after which some second token's input lies in the
    row space, best fit first, at most `most` of them (see the module docstring). Second
    tokens are tried in the order `stand_ins` stand-in first tokens (the commonest) rank them,
    as many as the row space's rank (every token of the batch may come near it); `sample`,
    `count`, `rounds` as in `Screen.search`."""
    fits = lambda res: res <= tol  # noqa: E731
    none = screen.basis.new_zeros(0, screen.basis.shape[1])
    runner, device = screen.runner, screen.vocab.device
    if screen.anchor is None:
        screen.anchor = int(screen.vocab[0])
    near = torch.full(screen.vocab.shape, float("inf"), dtype=screen.basis.dtype, device=device)
    for stand_in in range(stand_ins):
        one = torch.zeros(1, dtype=torch.long, device=device)
        with torch.no_grad():
            _, kv = runner.run(runner.empty(), one, 0, ids=screen.vocab[stand_in : stand_in + 1])
        checked = screen.check(kv, 0, 1, sample, count, rounds, fits, none)
        near[checked.index] = torch.minimum(near[checked.index], checked.residual)
    ranker = first_position_ranker(screen)
    found: dict[int, float] = {}
    for second in near.argsort()[: screen.basis.shape[0]].tolist():
        token = int(screen.vocab[second])

        def evaluate(ids: torch.Tensor, token: int = token) -> torch.Tensor:
            return pair_inputs(screen, screen.vocab[ids], token)

        checked = screen.search(evaluate, ranker, sample, count, rounds, fits, none)
        for index, residual in zip(checked.index.tolist(), checked.residual.tolist()):
            if fits(residual):
                found[index] = min(residual, found.get(index, residual))
        if len(found) >= most:  # as many first tokens as sentences
            break
    best_first = sorted(found, key=found.__getitem__)
    return torch.tensor(best_first, dtype=torch.long, device=device)
