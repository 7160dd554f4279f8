"""Where an audited step's gradient comes from, chosen once when the auditor is built.

`PlainGradients`: the `.grad` an optimizer is about to apply, labelled "clipped" when its
norm sits at `max_grad_norm`. `ReleasedGradients` (in `dp_source`, imported only for a DP
run): what an Opacus DP-SGD step releases, with the engine's ε.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradaudit.errors import GradAuditError
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.batch import Batch
from gradaudit.training.config import AuditConfig

# Relative slack when telling a clipped total norm (== max_grad_norm) from an unclipped one.
_CLIP_TOLERANCE = 1e-3


class GradientSource(Protocol):
    """The gradient of each audited step: how to watch for steps, label and copy it."""

    model: nn.Module  # the model whose parameters hold the gradient (unwrapped)
    kind: str  # the gradient an audit is labelled with before it is captured
    dp_optimizer: Any  # the Opacus DPOptimizer whose release is audited, or None

    def watch(self, on_step: Callable[[], None]) -> RemovableHandle | None:
        """Call `on_step()` right before each optimizer step (None: the caller must)."""

    def releases_nothing(self) -> bool:
        """True when the step being taken releases nothing to audit."""

    def label(self, kind: str) -> tuple[str, dict[str, float]]:
        """The gradient `kind` asked for as it will be captured, and what tells so."""

    def snapshot(
        self, batch: Batch, modules: list[str], kind: str, step: int, include_weights: bool
    ) -> GradientSnapshot:
        """CPU copy of this step's `kind` gradient of `modules` (and weights if asked)."""

    def at_precision(self, snapshot: GradientSnapshot, precision: dict[str, torch.dtype]) -> str:
        """Round `snapshot`'s gradients to the float type each module computed in; its name."""

    def epsilon(self) -> float | None:
        """ε spent so far, when known."""

    def privacy(self) -> dict[str, Any] | None:
        """The privacy statement (ε and its assumptions in words), when known."""


class PlainGradients:
    """`.grad` of the model's parameters, read in the optimizer's step pre-hook (if any)."""

    kind = "raw"
    dp_optimizer = None

    def __init__(
        self, model: nn.Module, optimizer: Any = None, max_grad_norm: float | None = None
    ) -> None:
        if optimizer is not None and not hasattr(optimizer, "register_step_pre_hook"):
            raise GradAuditError(
                f"optimizer {type(optimizer).__name__} has no register_step_pre_hook: use a "
                "torch.optim.Optimizer (torch >= 2.0), or pass no optimizer and call "
                "auditor.before_step() before each optimizer.step()"
            )
        self.model = model
        self._optimizer = optimizer
        self._max_grad_norm = max_grad_norm

    def watch(self, on_step: Callable[[], None]) -> RemovableHandle | None:
        if self._optimizer is None:
            return None
        return self._optimizer.register_step_pre_hook(lambda *_: on_step())

    def releases_nothing(self) -> bool:
        return False

    def label(self, kind: str) -> tuple[str, dict[str, float]]:
        """Clipped when the total norm reached `max_grad_norm`, else raw; with the norms."""
        if not self._max_grad_norm or self._max_grad_norm <= 0:
            return "raw", {}
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        norm = float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        )
        clipped = norm >= self._max_grad_norm * (1 - _CLIP_TOLERANCE)
        return ("clipped" if clipped else "raw"), {
            "grad_norm": norm,
            "max_grad_norm": self._max_grad_norm,
        }

    def snapshot(
        self, batch: Batch, modules: list[str], kind: str, step: int, include_weights: bool
    ) -> GradientSnapshot:
        return GradientSnapshot.from_grads(
            self.model, batch, modules, kind=kind, step=step, include_weights=include_weights
        )

    def at_precision(self, snapshot: GradientSnapshot, precision: dict[str, torch.dtype]) -> str:
        return round_to_precision(snapshot, precision)

    def epsilon(self) -> float | None:
        return None

    def privacy(self) -> dict[str, Any] | None:
        return None


def round_to_precision(snapshot: GradientSnapshot, precision: dict[str, torch.dtype]) -> str:
    """Round each weight gradient to the float type its module computed in, when narrower.

    Under autocast (bf16=True, fp16=True) a linear module computes in bfloat16 or float16
    while its parameter and `.grad` stay float32: the gradient carries that rounding, and the
    copy is rounded to it so that its rank is read at the precision it has (the training
    gradient is untouched). `snapshot.meta["precision"]` records each module's type; the
    coarsest is returned.
    """
    used = {}
    for module in snapshot.modules:
        name = f"{module}.weight"
        grad = snapshot.gradients.get(name)
        if grad is None:
            continue
        computed = precision.get(module, grad.dtype)
        if torch.finfo(computed).eps > torch.finfo(grad.dtype).eps:
            snapshot.gradients[name] = grad.to(computed).to(grad.dtype)
        else:
            computed = grad.dtype
        used[module] = str(computed).removeprefix("torch.")
    snapshot.meta = {**snapshot.meta, "precision": used}
    if not used:
        return "float32"
    return max(used.values(), key=lambda t: torch.finfo(getattr(torch, t)).eps)


def dp_optimizer_of(optimizer: Any) -> Any:
    """`privacy.release.find_dp_optimizer(optimizer)`, without importing Opacus for it."""
    # No DPOptimizer exists before opacus is imported: runs without DP never import it.
    if optimizer is None or "opacus" not in sys.modules:
        return None
    from gradaudit.privacy.release import find_dp_optimizer

    return find_dp_optimizer(optimizer)


def gradient_source(
    model: nn.Module,
    config: AuditConfig,
    *,
    optimizer: Any = None,
    max_grad_norm: float | None = None,
    privacy_engine: Any = None,
    dataset_size: int | None = None,
) -> GradientSource:
    """The release of `optimizer`'s DPOptimizer if it is (or wraps) one, else its `.grad`.

    A DP run is refused when it could not audit the released gradient or report ε; an
    `AuditConfig.dp_contrast` without a DPOptimizer is refused.
    """
    dp_optimizer = dp_optimizer_of(optimizer)
    if dp_optimizer is not None or privacy_engine is not None:
        # Imported here: runs without DP never import Opacus.
        from gradaudit.training.dp_source import ReleasedGradients

        return ReleasedGradients(
            model, dp_optimizer, privacy_engine, delta=config.dp_delta, dataset_size=dataset_size
        )
    if config.dp_contrast:
        raise GradAuditError(
            "dp_contrast audits the raw gradient behind a DP-SGD release, but the optimizer "
            "is not (and wraps no) Opacus DPOptimizer: pass optimizer= the optimizer "
            "PrivacyEngine.make_private returned, or set dp_contrast=False"
        )
    return PlainGradients(model, optimizer, max_grad_norm)
