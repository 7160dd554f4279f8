"""The gradient an Opacus DP-SGD step releases, read from a live `DPOptimizer`.

DP-SGD clips each example's gradient, sums, adds Gaussian noise σ·C and divides by the
expected batch size; only that result leaves the machine. Every access to Opacus internals
(`GradSampleModule._module`, the optimizer's flat per-example gradients, closing the hooks)
lives in this file, behind the few functions below.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradaudit.errors import GradAuditError
from gradaudit.gradients.snapshot import GradientSnapshot, weight_names


def is_dp_optimizer(optimizer: Any) -> bool:
    """True for an Opacus `DPOptimizer` (clips, noises and averages before stepping)."""
    return isinstance(optimizer, DPOptimizer)


def find_dp_optimizer(optimizer: Any) -> DPOptimizer | None:
    """The Opacus `DPOptimizer` that `optimizer` is or wraps, else None.

    Wrappers keep the optimizer they wrap as `.optimizer`: accelerate's `AcceleratedOptimizer`
    does, and it is what a `transformers.Trainer` hands its callbacks.
    """
    while optimizer is not None and not is_dp_optimizer(optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _require_dp(optimizer: Any) -> DPOptimizer:
    found = find_dp_optimizer(optimizer)
    if found is None:
        raise GradAuditError(
            f"{type(optimizer).__name__} is not (and wraps no) Opacus DPOptimizer: make the "
            "model private with opacus.PrivacyEngine().make_private(...) first"
        )
    return found


def watch_released_gradients(optimizer: Any, on_step: Callable[[], None]) -> RemovableHandle:
    """Run `on_step()` inside each real DP-SGD step, when `p.grad` holds the released gradient.

    A step pre-hook on the wrapped `original_optimizer`: it fires after per-example clipping,
    summing, noise and averaging, and after the accountant's `step_hook` counted the step
    (which it leaves alone), before the update; never for virtual steps of a
    BatchMemoryManager. Empty Poisson batches fire too (see `step_batch_size`).
    `handle.remove()` stops it.
    """
    return _require_dp(optimizer).original_optimizer.register_step_pre_hook(lambda *_: on_step())


def step_batch_size(optimizer: Any) -> int:
    """Examples behind the DP step being taken (0 for an empty Poisson batch)."""
    grad_samples = _require_dp(optimizer).grad_samples
    return int(grad_samples[0].shape[0]) if grad_samples else 0


def is_empty_batch(batch: Mapping[str, torch.Tensor]) -> bool:
    """True for a Poisson batch that sampled no example (batch dimension 0)."""
    return int(batch["input_ids"].shape[0]) == 0


def prepare_empty_step(optimizer: Any) -> None:
    """Give every parameter zero per-example gradients, for an empty Poisson batch.

    Transformers cannot run a forward pass on zero examples; with this, `optimizer.step()`
    still releases pure noise and the accountant still counts the step, as DP-SGD requires.
    """
    for p in _require_dp(optimizer).params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def dp_step(
    model: nn.Module,
    optimizer: Any,
    batch: Mapping[str, torch.Tensor],
    *,
    backward: Callable[[torch.Tensor], Any] | None = None,
) -> torch.Tensor | None:
    """One DP-SGD step of an Opacus loop on `batch`; its loss, or None for an empty batch.

    An empty Poisson batch gets `prepare_empty_step` (transformers cannot run on zero
    examples, and the step must still release noise and be counted); any other batch a
    forward and `backward(loss)` (default `loss.backward()`; pass `accelerator.backward`
    under Accelerate). Then `optimizer.step()` and `optimizer.zero_grad()`: Opacus keeps
    per-example and summed gradients until its own `zero_grad`. `optimizer` is a
    DPOptimizer or a wrapper of one.
    """
    loss = None
    if is_empty_batch(batch):
        prepare_empty_step(optimizer)
    else:
        loss = model(**batch).loss
        (backward or torch.Tensor.backward)(loss)
        loss = loss.detach()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside an Opacus `GradSampleModule` (or the model itself)."""
    return model._module if isinstance(model, GradSampleModule) else model


def _dp_denominator(optimizer: DPOptimizer) -> float:
    if optimizer.loss_reduction == "mean":
        return float(optimizer.expected_batch_size * optimizer.accumulated_iterations)
    return 1.0


def dp_snapshot(
    model: nn.Module,
    optimizer: Any,
    batch: Mapping[str, torch.Tensor],
    modules: Iterable[str],
    *,
    kind: str = "noised",
    include_bias: bool = False,
    step: int | None = None,
    include_weights: bool = False,
) -> GradientSnapshot | None:
    """Snapshot of a DP step from inside `watch_released_gradients`; None for an empty batch.

    `kind` "noised": `p.grad`, exactly what the step releases; "clipped": the same without
    noise; "raw": the mean per-example gradient, the unprotected gradient behind the step
    (refused when the DPOptimizer holds another number of examples than `batch`, as after
    virtual steps).
    `model` may be the Opacus-wrapped module or the original one; `optimizer` a DPOptimizer
    or a wrapper of one.
    """
    optimizer = _require_dp(optimizer)
    examples = step_batch_size(optimizer)
    if examples == 0:
        return None
    if kind == "raw" and examples != int(batch["input_ids"].shape[0]):
        raise GradAuditError(
            f"the raw gradient needs the per-example gradients of all {batch['input_ids'].shape[0]}"
            f" examples of the batch, but the DPOptimizer holds {examples} (virtual steps of a "
            "BatchMemoryManager and other ranks' examples are not kept): audit only the "
            "released gradient"
        )
    base = unwrap_model(model)
    modules = list(modules)
    gradients = _step_gradients(base, optimizer, weight_names(base, modules, include_bias), kind)
    snapshot = GradientSnapshot.from_gradients(
        base, batch, modules, gradients, kind, step, include_weights
    )
    snapshot.meta["dp"] = {
        "noise_multiplier": float(optimizer.noise_multiplier),
        "clip": float(optimizer.max_grad_norm),
        "expected_batch_size": optimizer.expected_batch_size,
        "batch_size": examples,
        "loss_reduction": optimizer.loss_reduction,
    }
    return snapshot


def _step_gradients(
    model: nn.Module, optimizer: DPOptimizer, names: Iterable[str], kind: str
) -> dict[str, torch.Tensor]:
    """CPU copies of the `kind` gradient of the parameters `names` of `model` in this step."""
    params = dict(model.named_parameters())
    trained = {id(p) for p in optimizer.params}
    gradients = {}
    for name in names:
        p = params[name]
        if id(p) not in trained:
            raise GradAuditError(
                f"{name!r} is not trained by this DPOptimizer (frozen or not passed to it): "
                "audit modules the optimizer updates"
            )
        if kind == "noised":
            grad = p.grad
        elif kind == "clipped":
            grad = p.summed_grad / _dp_denominator(optimizer)
        elif kind == "raw":
            samples = optimizer._get_flat_grad_sample(p)
            grad = samples.mean(0) if optimizer.loss_reduction == "mean" else samples.sum(0)
        else:
            raise GradAuditError(f"kind {kind!r} is not one of noised, clipped, raw")
        gradients[name] = grad.detach().to("cpu", copy=True).view_as(p)
    return gradients


@contextlib.contextmanager
def per_example_hooks(model: nn.Module) -> Iterator[GradSampleModule]:
    """Opacus per-example hooks with eval behaviour: no dropout, like `capture`.

    Opacus records activations only for modules in training mode, so exactly the modules
    holding trainable parameters (Linear, Embedding, LayerNorm: mode-independent) are put
    in training mode; dropout and attention stay in eval mode. Modes are restored.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for _, module in trainable_modules(model):
        module.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        gsm = GradSampleModule(model, loss_reduction="mean", strict=False)
        try:
            yield gsm
        finally:
            gsm._close()
            for module, mode in modes.items():
                module.train(mode)
