"""What each DP-SGD step releases, recorded independently of the auditor, for comparison."""

from __future__ import annotations

from typing import Any

import torch


class Releases:
    """Per step (1-based): the released `param.grad`, the engine's ε at δ, and the batch size.

    A step pre-hook on the DPOptimizer's wrapped optimizer, like the auditor's: it sees `p.grad`
    after per-example clipping, noise and averaging, before the update. Empty Poisson batches
    count as steps of size 0 and release nothing recorded here.
    """

    def __init__(self, dp_optimizer: Any, param: torch.Tensor, engine: Any, delta: float) -> None:
        self.gradients: dict[int, torch.Tensor] = {}
        self.epsilons: dict[int, float] = {}
        self.sizes: list[int] = []
        self._optimizer, self._param, self._engine, self._delta = (
            dp_optimizer, param, engine, delta
        )  # fmt: skip
        dp_optimizer.original_optimizer.register_step_pre_hook(self._record)

    def _record(self, *_: Any) -> None:
        self.sizes.append(len(self._optimizer.grad_samples[0]))
        if self.sizes[-1]:
            step = len(self.sizes)
            self.gradients[step] = self._param.grad.detach().clone()
            self.epsilons[step] = self._engine.get_epsilon(self._delta)
