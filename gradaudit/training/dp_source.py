"""`ReleasedGradients`: the gradient an Opacus DP-SGD step releases, and the engine's ε.

Imported only for a DP run (it imports Opacus); everything it reads from Opacus goes through
`gradaudit.privacy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from gradaudit.errors import GradAuditError
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.batch import Batch
from gradaudit.privacy import (
    dp_snapshot,
    engine_epsilon,
    engine_statement,
    step_batch_size,
    unwrap_model,
    watch_released_gradients,
)


def check_dp_wiring(
    dp_optimizer: Any, privacy_engine: Any, delta: float | None, dataset_size: int | None
) -> None:
    """Refuse a DP run whose audits would attack the wrong gradient or miss ε."""
    if dp_optimizer is None:
        raise GradAuditError(
            "privacy_engine was given but the optimizer is not (and wraps no) Opacus "
            "DPOptimizer, so the audit would attack the raw gradient, not the released one: "
            "pass optimizer= the optimizer PrivacyEngine.make_private returned"
        )
    if privacy_engine is None:
        raise GradAuditError(
            "the optimizer is an Opacus DPOptimizer but no privacy_engine was given, so ε "
            "cannot be reported: pass privacy_engine= the PrivacyEngine that made it private "
            "(or the Opacus accountant attached to it)"
        )
    if delta is None and not dataset_size:
        raise GradAuditError(
            "ε needs δ: pass dataset_size= (δ = 1/N for N training examples) or set "
            "AuditConfig.dp_delta"
        )


class ReleasedGradients:
    """What a DPOptimizer releases ("noised"), taken inside its real steps; or, on request,
    the raw mean per-example gradient behind it.

    The model's parameters are the ones inside an Opacus `GradSampleModule`. ε comes from the
    engine's own accountant at δ (`delta`, else 1/`dataset_size`).
    """

    kind = "noised"

    def __init__(
        self,
        model: nn.Module,
        dp_optimizer: Any,
        privacy_engine: Any,
        *,
        delta: float | None,
        dataset_size: int | None,
    ) -> None:
        self.model = unwrap_model(model)
        check_dp_wiring(dp_optimizer, privacy_engine, delta, dataset_size)
        self.dp_optimizer = dp_optimizer
        self._engine = privacy_engine
        self._delta = delta if delta is not None else 1.0 / dataset_size
        self._dataset_size = dataset_size

    def watch(self, on_step: Callable[[], None]) -> RemovableHandle:
        # Inside each real DP step: after clipping, noise and averaging, before the update.
        return watch_released_gradients(self.dp_optimizer, on_step)

    def releases_nothing(self) -> bool:
        return step_batch_size(self.dp_optimizer) == 0  # an empty Poisson batch: pure noise

    def label(self, kind: str) -> tuple[str, dict[str, float]]:
        return kind, {}

    def snapshot(
        self, batch: Batch, modules: list[str], kind: str, step: int, include_weights: bool
    ) -> GradientSnapshot:
        return dp_snapshot(
            self.model, self.dp_optimizer, batch, modules,
            kind=kind, step=step, include_weights=include_weights,
        )  # fmt: skip

    def at_precision(self, snapshot: GradientSnapshot, precision: dict) -> str:
        """The release is float32: noise is added after any mixed-precision rounding."""
        return "float32"

    def epsilon(self) -> float | None:
        return engine_epsilon(self._engine, self._delta)

    def privacy(self) -> dict[str, Any] | None:
        clip = getattr(self.dp_optimizer, "max_grad_norm", None)
        return engine_statement(
            self._engine, self._delta, clip=clip, dataset_size=self._dataset_size
        )
