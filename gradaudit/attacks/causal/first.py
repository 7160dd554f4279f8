"""Position 0, where every sentence starts from the empty prefix: one search for all.

Checking the whole vocabulary costs one pass through the observed module's layers per token
(75 s at SmolLM2 layer 15 on one core). Where the screen's features come from a shallower
module, a regression from every token's position-0 input to that module leads the search
instead (docs/span-method.md, "Position 0").
"""

from __future__ import annotations

import torch

from gradaudit.attacks.causal.prefix import PrefixRunner
from gradaudit.attacks.causal.screen import Checked, Effort, Ranker, Screen, relative_residual

ROUNDS = 6  # most rounds of the led search (64 to 2,048 tokens)


class FirstPosition:
    """Tokens whose position-0 inputs lie in the row space of `screen`'s module."""

    def __init__(self, screen: Screen) -> None:
        self.screen = screen
        self._ranker: Ranker | None = None
        self._every: Checked | None = None  # the whole vocabulary's fits (see `every_fit`)

    @property
    def ranker(self) -> Ranker | None:
        """The regression over every candidate's input to the feature module at position 0,
        or None where that module is the observed one (its inputs are exact)."""
        screen = self.screen
        if screen.feature_runner is screen.runner:
            return None
        if self._ranker is None:
            x = self.inputs(screen.feature_runner)
            self._ranker = screen.ranker_of(x)
        return self._ranker

    def inputs(
        self, runner: PrefixRunner | None = None, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Inputs at position 0 of vocabulary indices `index` (all by default), to the module
        `runner` stops at (the observed one by default)."""
        screen = self.screen
        ids = screen.vocab if index is None else screen.vocab[index]
        runner = runner or screen.runner
        return screen.inputs(runner.empty(), torch.zeros_like(ids), 0, ids, runner)

    def check(
        self, effort: Effort, own: torch.Tensor, exhaustive: bool, enough: int = 1
    ) -> Checked:
        """Tokens checked at position 0: the whole vocabulary when `exhaustive` or without a
        shallower feature module; else the `sample`, then `ROUNDS` rounds of `count`
        (doubling) that the regression puts nearest the row space, stopping once `enough`
        fit (as many as sentences). A first token it misses loses its sentence, which repair
        finds again on the whole vocabulary. `own`: inputs counted as echoes."""
        screen = self.screen
        ranker = None if exhaustive else self.ranker
        if ranker is None:
            every = self.every_fit()
            return Checked(every.index, screen.novel_residual(every.inputs, own))
        index = effort.sample
        x = self.inputs(index=index)
        residual = screen.novel_residual(x, own)
        coef = None
        for k in range(ROUNDS):
            if int(effort.fits(residual).sum()) >= enough:
                break
            coef = ranker.fit(index, x)
            top = screen.nearest(coef, index, effort.count << k, ranker)
            new = self.inputs(index=top)
            index, x = torch.cat([index, top]), torch.cat([x, new])
            residual = torch.cat([residual, screen.novel_residual(new, own)])
        return Checked(index, residual, coef)

    def every_fit(self) -> Checked:
        """The tokens whose position-0 inputs fit the row space, and the best one where none
        does, with their inputs: position 0 has no context, so the whole vocabulary's pass
        is made once; a later check differs only in its echoes (SmolLM2 key@28: 70 s a pass,
        made by growth and again by each repair)."""
        if self._every is None:
            screen = self.screen
            every = torch.arange(int(screen.vocab.shape[0]), device=screen.vocab.device)
            x = self.inputs(index=every)
            residual = relative_residual(x, screen.basis)
            keep = (residual <= screen.tol) | (residual == residual.min())
            self._every = Checked(every[keep], residual[keep], inputs=x[keep])
        return self._every
