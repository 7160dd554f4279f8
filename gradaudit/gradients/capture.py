"""Gradient capture: the loss gradient of selected modules for one batch, off the training path."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from gradaudit.gradients.snapshot import GradientSnapshot, weight_names
from gradaudit.model.batch import check_batch, model_inputs


def capture(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    modules: Iterable[str],
    *,
    include_bias: bool = False,
    step: int | None = None,
    include_weights: bool = False,
    train_mode: bool = False,
    seed: int = 0,
) -> GradientSnapshot:
    """Compute the loss gradient of the selected modules' weights for `batch`.

    By default in eval mode (no dropout). With `train_mode`, in training mode as fine-tuning
    runs (dropout on), its masks drawn from the torch generator seeded with `seed`, so the
    audit measures the gradient training really produces. Through `torch.autograd.grad`: no
    `.grad` is touched; every module's mode and every torch generator are restored. A causal
    LM's batch may lack labels (they are its input ids; see `check_batch`). Modules whose input
    had no token axis (a pooler, a classifier on [CLS]) are listed in `meta["not_per_token"]`.
    """
    modules = list(modules)
    batch = check_batch(dict(batch), model)
    params = dict(model.named_parameters())
    names = weight_names(model, modules, include_bias)
    device = next(model.parameters()).device
    with (
        _mode(model, train_mode),
        _seeded(seed if train_mode else None, device),
        torch.enable_grad(),
        _input_shapes(model, modules) as shapes,
    ):
        loss = model(**model_inputs(model, {k: v.to(device) for k, v in batch.items()})).loss
        grads = torch.autograd.grad(loss, [params[n] for n in names])
    gradients = {n: g.detach().to("cpu") for n, g in zip(names, grads)}
    snapshot = GradientSnapshot.from_gradients(
        model, batch, modules, gradients, "raw", step, include_weights
    )
    snapshot.meta["train_mode"] = train_mode
    width = int(batch["input_ids"].shape[1])
    snapshot.meta["not_per_token"] = {
        m: [list(s) for s in seen] for m, seen in shapes.items() if _pooled(seen, width)
    }
    if train_mode:
        snapshot.meta["dropout_seed"] = seed
    return snapshot


@contextlib.contextmanager
def _input_shapes(model: nn.Module, modules: list[str]) -> Iterator[dict[str, list[tuple]]]:
    """The input shape of every call of each module in `modules` while inside."""
    shapes: dict[str, list[tuple]] = {m: [] for m in modules}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if args:
                shapes[name].append(tuple(args[0].shape))

        return hook

    handles = [model.get_submodule(m).register_forward_pre_hook(keep(m)) for m in modules]
    try:
        yield shapes
    finally:
        for handle in handles:
            handle.remove()


def _pooled(shapes: list[tuple], width: int) -> bool:
    """True when some call's input had no token axis of the batch's width."""
    return any(len(shape) < 3 or shape[-2] != width for shape in shapes)


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """`model` in training (or eval) mode; each module's own mode restored on exit."""
    modes = {module: module.training for module in model.modules()}
    model.train(train)
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """The generator dropout draws from on `device` seeded with `seed`, restored on exit.

    Only that generator is touched (CPU, or the one GPU), so nothing else in the process
    sees a changed random stream.
    """
    on_gpu = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_gpu else []):
        if seed is not None:
            if on_gpu:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            else:
                torch.random.default_generator.manual_seed(seed)
        yield
