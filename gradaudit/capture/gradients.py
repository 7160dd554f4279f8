"""Gradient capture: the loss gradient of selected modules for one batch, off the training path."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from gradaudit.capture.snapshot import GradientSnapshot, weight_names
from gradaudit.model.batch import check_batch


def capture(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    modules: Iterable[str],
    *,
    include_bias: bool = False,
    step: int | None = None,
    include_weights: bool = False,
) -> GradientSnapshot:
    """Compute the loss gradient of the selected modules' weights for `batch`.

    Runs in eval mode (no dropout, so the adversary's forward matches exactly) through
    `torch.autograd.grad`: no `.grad` is touched; train/eval mode and RNG state are restored.
    """
    modules = list(modules)
    batch = check_batch(dict(batch))
    params = dict(model.named_parameters())
    names = weight_names(model, modules, include_bias)
    device = next(model.parameters()).device
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.eval()
        try:
            with torch.enable_grad():
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                grads = torch.autograd.grad(loss, [params[n] for n in names])
        finally:
            model.train(was_training)
    gradients = {n: g.detach().to("cpu") for n, g in zip(names, grads)}
    return GradientSnapshot.from_gradients(
        model, batch, modules, gradients, "raw", step, include_weights
    )
