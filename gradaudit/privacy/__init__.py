"""Differential privacy: ε accounting, the gradient a DP-SGD step releases, simulated DP-SGD.

`accounting` is pure analysis; `release` reads a live Opacus `DPOptimizer` (and holds every
use of Opacus internals); `simulate` privatizes per-example gradients the way DP-SGD would.
"""

from gradaudit.privacy.accounting import (
    check_dp_parameters,
    default_delta,
    engine_epsilon,
    engine_statement,
    epsilon,
    privacy_statement,
)
from gradaudit.privacy.release import (
    dp_snapshot,
    dp_step,
    find_dp_optimizer,
    is_empty_batch,
    prepare_empty_step,
    step_batch_size,
    unwrap_model,
    watch_released_gradients,
)
from gradaudit.privacy.simulate import (
    PerSampleGradients,
    check_opacus_compatible,
    per_sample_gradients,
    private_snapshot,
    privatize,
)

__all__ = [
    "PerSampleGradients",
    "check_dp_parameters",
    "check_opacus_compatible",
    "default_delta",
    "dp_snapshot",
    "dp_step",
    "engine_epsilon",
    "engine_statement",
    "epsilon",
    "find_dp_optimizer",
    "is_empty_batch",
    "per_sample_gradients",
    "prepare_empty_step",
    "private_snapshot",
    "privacy_statement",
    "privatize",
    "step_batch_size",
    "unwrap_model",
    "watch_released_gradients",
]
