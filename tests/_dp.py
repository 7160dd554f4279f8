"""DP-SGD test helpers: a tiny private training set-up, and what each step releases, recorded
independently of the auditor, for comparison."""

from __future__ import annotations

from typing import Any

import torch
from conftest import make_tiny_model
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 60


def tiny_batch(n: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded sentence
    ids[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 2}


def private_training(sigma: float, n: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = make_tiny_model(VOCAB).train()
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    batch = tiny_batch(n, seed=seed)
    data = TensorDataset(batch["input_ids"], batch["attention_mask"], batch["labels"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=1),  # Poisson, q = 0.1
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    return model, private, optimizer, loader, engine


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
