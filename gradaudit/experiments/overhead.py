"""What auditing costs a training loop: step times with and without an `Auditor`."""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.model.batch import make_batch
from gradaudit.training.auditor import Auditor
from gradaudit.training.config import AuditConfig


@dataclass
class Overhead:
    """Seconds per training step (warm-up excluded) in three runs of the same fine-tuning.

    `plain`: no auditor; `capture`: snapshots saved at sampled steps, no attack;
    `background`: snapshots attacked by the worker process while training goes on.
    """

    steps: int
    audited_steps: int
    mean_plain: float
    mean_capture: float
    mean_background: float
    p95_plain: float
    p95_capture: float
    p95_background: float

    @property
    def capture_ratio(self) -> float:
        """Mean step time with capture only over without the auditor."""
        return self.mean_capture / self.mean_plain

    @property
    def background_p95_ratio(self) -> float:
        """Step-time p95 with background attacks on over attacks off (capture only)."""
        return self.p95_background / self.p95_capture

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "capture_ratio": self.capture_ratio,
            "background_p95_ratio": self.background_p95_ratio,
        }


def _step_times(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    config: AuditConfig | None,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
) -> list[float]:
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    auditor = None
    if config is not None:
        auditor = Auditor(model, config, tokenizer=tokenizer, optimizer=optimizer)
    torch.manual_seed(seed)  # the same dropout masks in every run
    times = []
    for batch in batches:
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()  # the auditor captures in its pre-hook
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    if auditor is not None:
        auditor.close()  # waits for the attacks; not part of any step time
    return times


def measure_overhead(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    steps: int = 30,
    batch_size: int = 8,
    every_n_steps: int = 10,
    modules: Sequence[str] = ("query@0",),
    attack: str = "gradmatch",
    budget: float = 0.01,
    warmup: int = 3,
    close_timeout_s: float = 60.0,
    seed: int = 0,
) -> Overhead:
    """Fine-tune a copy of `model` for `steps` steps (plain torch loop, AdamW) three times.

    Audits every `every_n_steps` steps; texts are cycled when there are too few. Attacks
    still running `close_timeout_s` after training are stopped (they time no step).
    """
    batches = []
    for i in range(steps):
        idx = [(i * batch_size + j) % len(texts) for j in range(batch_size)]
        batches.append(
            make_batch(model, tokenizer, [texts[k] for k in idx], [labels[k] for k in idx])
        )
    runs = {}
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as out:
        settings = {"modules": list(modules), "every_n_steps": every_n_steps, "budget": budget}
        configs = {
            "plain": None,
            "capture": AuditConfig(**settings, attack=None, output_dir=f"{out}/capture"),
            "background": AuditConfig(
                **settings,
                attack=attack,
                output_dir=f"{out}/background",
                close_timeout_s=close_timeout_s,
            ),
        }
        for name, config in configs.items():
            runs[name] = np.array(_step_times(model, batches, config, tokenizer, seed)[warmup:])
    return Overhead(
        steps=steps,
        audited_steps=sum(configs["capture"].is_sampled(s) for s in range(1, steps + 1)),
        **{f"mean_{k}": float(v.mean()) for k, v in runs.items()},
        **{f"p95_{k}": float(np.percentile(v, 95)) for k, v in runs.items()},
    )
