"""From a captured snapshot to its results: save it, attack each module group, record.

In background mode a thread of its own writes snapshots (off the training step) and the
spawned worker attacks them; otherwise both happen inline, under `preserve_rng`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig
from gradaudit.training.worker import BackgroundAttacker, Job, run_job


@contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore the python, numpy and torch (CPU and CUDA) generators on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class Dispatcher:
    """Saves snapshots and attacks them per module group; every outcome goes to `on_result`.

    `on_result` may be called from the writer thread or the worker's dispatcher thread.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        config: AuditConfig,
        modules: list[str],
        on_result: Callable[[AuditResult], None],
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._config = config
        self._modules = modules
        self._on_result = on_result
        self._attack_model: nn.Module | None = None
        self._writer = None
        self._attacker = None
        if config.background:  # snapshots are written from a thread of its own
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradaudit-writer")
            if config.attack is not None:
                self._attacker = BackgroundAttacker(model, tokenizer, config, on_result)

    def submit(self, snapshot: GradientSnapshot, job: Job) -> None:
        """Save and attack `snapshot` (its tensors are copies: writing them can wait)."""
        if self._writer is not None:
            self._writer.submit(self._save_and_attack, snapshot, job)
        else:
            self._save_and_attack(snapshot, job)

    def close(self) -> None:
        """Finish writing; wait for pending attacks at most `close_timeout_s`."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._attacker is not None:
            self._attacker.close(self._config.close_timeout_s)

    def _save_and_attack(self, snapshot: GradientSnapshot, job: Job) -> None:
        """Write the snapshot, then attack each module group (inline or in the worker)."""
        attack = self._config.attack or "none"
        try:
            snapshot.save(job.directory)
        except Exception as error:  # noqa: BLE001 - a failed save is recorded, never raised
            self._on_result(job.result(attack, f"saving failed: {type(error).__name__}: {error}"))
            return
        if self._config.attack is None:
            self._on_result(
                job.result(
                    attack,
                    "not attacked (capture only, attack is None): attack the snapshot with "
                    f"`gradaudit attack {job.directory} --model ...`",
                )
            )
            return
        separate = self._config.separate_modules
        groups = [[m] for m in self._modules] if separate else [self._modules]
        for i, group in enumerate(groups):
            part = dataclasses.replace(job, modules=group, release=i == len(groups) - 1)
            if self._attacker is not None:
                self._attacker.submit(part)
            else:
                self._on_result(self._attack_inline(part))

    def _attack_inline(self, job: Job) -> AuditResult:
        with preserve_rng():
            if self._attack_model is None:  # weights come from the snapshot; no hooks on it
                try:
                    self._attack_model = type(self._model)(self._model.config)
                except Exception as error:  # noqa: BLE001 - recorded, never raised
                    return job.result(self._config.attack, f"cannot rebuild the model: {error}")
            return run_job(self._attack_model, self._tokenizer, self._config, job)
