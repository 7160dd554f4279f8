"""Differential privacy: ε with its assumptions in words, and the gradient DP-SGD releases.

DP-SGD (Opacus) clips each example's gradient, sums, adds Gaussian noise σ·C and divides by
the expected batch size; only that result leaves the machine. Everything here audits that
released gradient ("noised"), or its noise-free clipped form ("clipped") for contrast.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus.accountants import create_accountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.hooks import RemovableHandle

from .batch import check_batch
from .errors import GradAuditError
from .families import layout
from .snapshot import GradientSnapshot, weight_names

ACCOUNTANTS = ("rdp", "prv")
SAMPLINGS = ("poisson", "shuffled")
CLIP_SCOPES = ("model", "modules")


def check_dp_parameters(
    *,
    noise_multiplier: float | None = None,
    clip: float | None = None,
    sample_rate: float | None = None,
    delta: float | None = None,
    steps: int | None = None,
    accountant: str | None = None,
) -> None:
    """Raise a GradAuditError naming the fix for each DP-SGD parameter given and out of range."""
    if noise_multiplier is not None and not (
        noise_multiplier >= 0 and math.isfinite(noise_multiplier)
    ):
        raise GradAuditError(
            f"noise multiplier σ = {noise_multiplier} is invalid: use σ ≥ 0 (0 means no noise)"
        )
    if clip is not None and not (clip > 0 and math.isfinite(clip)):
        raise GradAuditError(
            f"clipping norm C = {clip} is invalid: use a positive per-example bound, e.g. 1.0"
        )
    if sample_rate is not None and not 0 < sample_rate <= 1:
        raise GradAuditError(
            f"sample rate q = {sample_rate} is outside (0, 1]: use the expected batch size "
            "divided by the data set size"
        )
    if delta is not None and not 0 < delta < 1:
        raise GradAuditError(
            f"δ = {delta} is outside (0, 1): use a small positive value, at most 1/N for N "
            "training examples"
        )
    if steps is not None and (int(steps) != steps or steps < 0):
        raise GradAuditError(f"steps = {steps} is invalid: use a whole number ≥ 0")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise GradAuditError(
            f"accountant {accountant!r} is not supported: choose one of {', '.join(ACCOUNTANTS)}"
        )


def default_delta(dataset_size: int) -> float:
    """δ = 1/N for a data set of N examples (N ≥ 2)."""
    if dataset_size < 2:
        raise GradAuditError(
            f"cannot derive δ = 1/N from a data set of {dataset_size} example(s): pass δ"
        )
    return 1.0 / dataset_size


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps, from an Opacus accountant (∞ when σ = 0).

    A negative value from the RDP conversion is reported as 0, which it implies.
    """
    check_dp_parameters(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        delta=delta,
        steps=steps,
        accountant=accountant,
    )
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return max(0.0, float(acc.get_epsilon(delta=delta)))


def _accountant(privacy_engine: Any) -> Any:
    # A PrivacyEngine keeps its accountant as `.accountant`; dp-transformers' Trainer exposes
    # the Opacus accountant itself. Either one counts the steps its DPOptimizer takes.
    return getattr(privacy_engine, "accountant", privacy_engine)


def engine_epsilon(privacy_engine: Any, delta: float) -> float:
    """ε spent so far by an Opacus `PrivacyEngine` (or accountant), from its accountant.

    A negative value from the RDP conversion is reported as 0.
    """
    check_dp_parameters(delta=delta)
    accountant = _accountant(privacy_engine)
    if len(accountant) == 0:
        return 0.0
    return max(0.0, float(accountant.get_epsilon(delta)))


def _number(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.4g}"


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return _number(low) if low == high else f"{_number(low)}–{_number(high)}"


def privacy_statement(
    *,
    noise_multiplier: float | Sequence[float],
    sample_rate: float | Sequence[float],
    steps: int,
    delta: float,
    accountant: str = "rdp",
    clip: float | None = None,
    sampling: str = "poisson",
    dataset_size: int | None = None,
    epsilon_value: float | None = None,
    source: str = "computed",
) -> dict[str, Any]:
    """ε with the assumptions behind it in words (TF Privacy's statement style), JSON-ready.

    `epsilon_value` is the engine's own ε when it ran (source "engine"); otherwise ε is
    computed from σ, q and steps (which then must be single numbers).
    """
    if sampling not in SAMPLINGS:
        raise GradAuditError(f"sampling {sampling!r} is not one of {', '.join(SAMPLINGS)}")
    sigmas = [noise_multiplier] if isinstance(noise_multiplier, (int, float)) else noise_multiplier
    rates = [sample_rate] if isinstance(sample_rate, (int, float)) else sample_rate
    sigmas, rates = [float(s) for s in sigmas], [float(q) for q in rates]
    for s in sigmas:
        check_dp_parameters(noise_multiplier=s)
    for q in rates:
        check_dp_parameters(sample_rate=q)
    check_dp_parameters(clip=clip, delta=delta, steps=steps, accountant=accountant)
    if epsilon_value is None:
        if len(sigmas) != 1 or len(rates) != 1:
            raise GradAuditError("pass epsilon_value when σ or q changed during training")
        epsilon_value = epsilon(sigmas[0], rates[0], steps, delta, accountant)
    data = f" over {dataset_size} examples" if dataset_size else ""
    clipping = f", per-example clipping norm C = {_number(clip)}" if clip is not None else ""
    lines = [
        f"DP-SGD{data} with noise multiplier σ = {_range(sigmas)}{clipping} and sampling rate "
        f"q = {_range(rates)}, for {steps} steps.",
    ]
    if max(sigmas) == 0 and steps > 0:
        lines.append(
            "σ = 0: no noise is added, so there is no differential privacy guarantee (ε = ∞); "
            "clipping alone bounds each example's influence but hides nothing."
        )
    else:
        run = " of the training run" if source == "engine" else ""
        lines += [
            f"Example-level DP with add-or-remove-one adjacency at δ = {delta:.3g}, computed "
            f"with Opacus's {accountant.upper()} accountant{run}: ε = {_number(epsilon_value)}.",
            "It covers every gradient released in those steps, and so any part of them (a "
            "partial gradient is post-processing of the release).",
            "It assumes each example joins each batch independently with probability q."
            if sampling == "poisson"
            else "The data were shuffled into fixed-size batches, not Poisson-sampled: this ε is "
            "what Poisson sampling would give, believed close but not a proven bound for "
            "shuffling.",
            "No user-level guarantee: someone with k examples in the data is protected only by "
            "group privacy, roughly k·ε.",
        ]
    return {
        "epsilon": epsilon_value,
        "delta": delta,
        "accountant": accountant,
        "source": source,
        "noise_multiplier": sigmas[0] if len(sigmas) == 1 else sigmas,
        "sample_rate": rates[0] if len(rates) == 1 else rates,
        "steps": int(steps),
        "clip": clip,
        "sampling": sampling,
        "unit": "example",
        "adjacency": "add-or-remove-one",
        "dataset_size": dataset_size,
        "statement": " ".join(lines),
    }


def engine_statement(
    privacy_engine: Any,
    delta: float,
    *,
    clip: float | None = None,
    sampling: str = "poisson",
    dataset_size: int | None = None,
) -> dict[str, Any]:
    """`privacy_statement` of an Opacus `PrivacyEngine` (or accountant), with its own ε."""
    accountant = _accountant(privacy_engine)
    history = list(accountant.history)
    return privacy_statement(
        noise_multiplier=[h[0] for h in history] or [0.0],
        sample_rate=[h[1] for h in history] or [1.0],
        steps=sum(int(h[2]) for h in history),
        delta=delta,
        accountant=accountant.mechanism(),
        clip=clip,
        sampling=sampling,
        dataset_size=dataset_size,
        epsilon_value=engine_epsilon(privacy_engine, delta),
        source="engine",
    )


def check_opacus_compatible(model: nn.Module) -> None:
    """Raise naming each trainable layer Opacus cannot give per-example gradients, and why."""
    problems = []
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:
            problems += [f"{name} ({type(module).__name__}): {e}" for e in validator(module)]
        elif any(True for _ in module.buffers()):
            problems.append(
                f"{name} ({type(module).__name__}): a trainable layer with buffers, whose state "
                "mixes examples"
            )
    if problems:
        raise GradAuditError(
            "Opacus cannot train this model with per-example clipping: "
            + "; ".join(problems)
            + ". Replace or freeze those layers (opacus ModuleValidator.fix swaps BatchNorm for "
            "GroupNorm and LSTM for DPLSTM)."
        )


# --- the released gradient of a DPOptimizer -------------------------------------------------


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
    params = dict(base.named_parameters())
    trained = {id(p) for p in optimizer.params}
    gradients = {}
    for name in weight_names(base, modules, include_bias):
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
    snapshot = GradientSnapshot._build(base, batch, modules, gradients, kind, step, include_weights)
    snapshot.meta["dp"] = {
        "noise_multiplier": float(optimizer.noise_multiplier),
        "clip": float(optimizer.max_grad_norm),
        "expected_batch_size": optimizer.expected_batch_size,
        "batch_size": examples,
        "loss_reduction": optimizer.loss_reduction,
    }
    return snapshot


# --- per-example gradients, clipped and noised by Opacus's own DPOptimizer -----------------


@dataclass
class PerSampleGradients:
    """Per-example gradients of the selected tensors and each example's clipping norm."""

    gradients: dict[str, torch.Tensor]
    norms: torch.Tensor
    batch: dict[str, torch.Tensor]
    modules: list[str]
    clip_scope: str


@contextlib.contextmanager
def _hooked_eval(model: nn.Module) -> Iterator[GradSampleModule]:
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


def per_sample_gradients(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    modules: Iterable[str],
    *,
    clip_scope: str = "model",
    include_bias: bool = False,
) -> PerSampleGradients:
    """Per-example gradients (Opacus `GradSampleModule`) of `modules`, and per-example norms.

    `clip_scope` "model" (faithful DP-SGD): each norm is the flat L2 norm over all trainable
    parameters of `model`; "modules" (cheaper, not DP-SGD): over the selected tensors only.
    Position ids are passed explicitly so trainable position embeddings get per-example
    gradients too. No `.grad` is touched.
    """
    if clip_scope not in CLIP_SCOPES:
        raise GradAuditError(f"clip scope {clip_scope!r} is not one of {', '.join(CLIP_SCOPES)}")
    check_opacus_compatible(model)
    modules = list(modules)
    batch = check_batch(dict(batch))
    names = weight_names(model, modules, include_bias)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    inputs["position_ids"] = layout(model).position_ids(inputs["attention_mask"])
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _hooked_eval(model) as gsm, torch.enable_grad():
        torch.autograd.grad(gsm(**inputs).loss, [p for _, p in trainable])
        scope = trainable if clip_scope == "model" else [(n, p) for n, p in trainable if n in names]
        squares = torch.stack([p.grad_sample.flatten(1).pow(2).sum(1) for _, p in scope], 1)
        gradients = {n: p.grad_sample.detach().to("cpu") for n, p in trainable if n in names}
    return PerSampleGradients(
        gradients={n: gradients[n] for n in names},
        norms=squares.sum(1).sqrt().detach().to("cpu"),
        batch=batch,
        modules=modules,
        clip_scope=clip_scope,
    )


def privatize(
    samples: PerSampleGradients,
    *,
    clip: float,
    sigma: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Clip to `clip`, sum, add N(0, (σ·C)²) and divide by the batch size: Opacus's DPOptimizer.

    The DPOptimizer runs on stand-in parameters holding the selected per-example gradients
    plus one holding the norm of all other trainable parameters, so its flat clipping norm
    is each example's full norm (for clip scope "model").
    """
    check_dp_parameters(noise_multiplier=sigma, clip=clip)
    selected_sq = torch.stack([g.flatten(1).pow(2).sum(1) for g in samples.gradients.values()], 1)
    rest = (samples.norms.pow(2) - selected_sq.sum(1)).clamp(min=0).sqrt().unsqueeze(1)
    per_sample = [*samples.gradients.values(), rest]
    params = [nn.Parameter(torch.zeros(g.shape[1:], dtype=g.dtype)) for g in per_sample]
    for p, g in zip(params, per_sample):
        p.grad_sample = g.detach()
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=float(sigma),
        max_grad_norm=float(clip),
        expected_batch_size=int(rest.shape[0]),
        generator=generator,
    )
    optimizer.pre_step()
    return {n: p.grad.detach().clone() for n, p in zip(samples.gradients, params)}


def private_snapshot(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor] | PerSampleGradients,
    modules: Iterable[str] | None = None,
    *,
    clip: float,
    sigma: float,
    seed: int = 0,
    clip_scope: str = "model",
    include_bias: bool = False,
    step: int | None = None,
) -> GradientSnapshot:
    """The gradient one DP-SGD step releases for `batch`: kind "noised" (σ > 0) or "clipped".

    Pass `PerSampleGradients` as `batch` to reuse them across σ (modules then come from it).
    """
    check_dp_parameters(noise_multiplier=sigma, clip=clip)
    if isinstance(batch, PerSampleGradients):
        samples = batch
    else:
        if modules is None:
            raise GradAuditError("pass the modules to snapshot, e.g. select_modules(model, ...)")
        samples = per_sample_gradients(
            model, batch, modules, clip_scope=clip_scope, include_bias=include_bias
        )
    generator = torch.Generator().manual_seed(seed)
    gradients = privatize(samples, clip=clip, sigma=sigma, generator=generator)
    kind = "noised" if sigma > 0 else "clipped"
    snapshot = GradientSnapshot._build(
        model, samples.batch, samples.modules, gradients, kind, step, False
    )
    snapshot.meta["dp"] = {
        "noise_multiplier": float(sigma),
        "clip": float(clip),
        "clip_scope": samples.clip_scope,
        "batch_size": int(samples.norms.shape[0]),
        "seed": seed,
        "clipped_examples": int((samples.norms > clip).sum()),
    }
    return snapshot
