"""Simulated DP-SGD: per-example gradients of a batch, clipped and noised by Opacus itself.

What one DP-SGD step would release for a batch, without training: for `dpsweep` and for
audits of a planned private run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn

from gradaudit.errors import GradAuditError
from gradaudit.gradients.snapshot import GradientSnapshot, weight_names
from gradaudit.model.batch import check_batch
from gradaudit.model.families import layout
from gradaudit.privacy.accounting import check_dp_parameters
from gradaudit.privacy.release import per_example_hooks

CLIP_SCOPES = ("model", "modules")


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


@dataclass
class PerSampleGradients:
    """Per-example gradients of the selected tensors and each example's clipping norm."""

    gradients: dict[str, torch.Tensor]
    norms: torch.Tensor
    batch: dict[str, torch.Tensor]
    modules: list[str]
    clip_scope: str


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
    with per_example_hooks(model) as gsm, torch.enable_grad():
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
    snapshot = GradientSnapshot.from_gradients(
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
