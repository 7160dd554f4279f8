"""From a captured snapshot to its results: record it pending, save it, attack each group.

In background mode a thread of its own writes snapshots (off the training step) and the
spawned worker attacks them; otherwise both happen inline, under `preserve_rng`. Every
outcome, failures included, goes to the `ResultStore`.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.io import describe_os_error, private_dir
from gradaudit.model.loading import ModelRecipe, rebuild
from gradaudit.scoring.result import AuditResult
from gradaudit.training.attacker import BackgroundAttacker
from gradaudit.training.config import AuditConfig
from gradaudit.training.results import PENDING, ResultStore
from gradaudit.training.worker import Job, run_job

_WRITER = "gradaudit-writer"


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


def save_snapshot(snapshot: GradientSnapshot, directory: str) -> str | None:
    """Save `snapshot` in `directory`; on failure remove what was written and say why."""
    try:
        private_dir(Path(directory).parent, tighten=True)
        snapshot.save(directory)
    except Exception as error:  # noqa: BLE001 - a failed save is recorded, never raised
        shutil.rmtree(directory, ignore_errors=True)
        if isinstance(error, OSError):
            why = describe_os_error(error, directory)
        else:
            why = f"{type(error).__name__}: {error} (writing to {directory})"
        return f"saving the snapshot failed: {why}; the partial snapshot was removed"
    return None


class Dispatcher:
    """Saves snapshots and attacks them per module group; outcomes go to `results`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        config: AuditConfig,
        modules: list[str],
        results: ResultStore,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._config = config
        self._modules = modules
        self._results = results
        self._attack_model: nn.Module | None = None
        self._writer = None
        self._attacker = None
        if config.background:  # snapshots are written from a thread of its own
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_WRITER)
            if config.attack is not None:
                self._attacker = BackgroundAttacker(model, tokenizer, config, results.add)

    def submit(self, snapshot: GradientSnapshot, job: Job) -> None:
        """Record `job` pending, then save and attack `snapshot` (copies: writing can wait)."""
        parts = self._parts(job)
        self._results.add_pending(part.result(self._attack_name, PENDING) for part in parts)
        if self._writer is None:
            self._save_and_attack(snapshot, parts)
            return
        try:
            self._writer.submit(self._save_and_attack, snapshot, parts)
        except RuntimeError:  # shut down (the process exits): left pending, then settled
            pass

    def close(self, timeout_s: float | None) -> None:
        """Finish writing; wait for pending attacks, at most `timeout_s` in all."""
        start = time.monotonic()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._attacker is not None:
            left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - start))
            self._attacker.close(left)

    def abort(self, why: str) -> None:
        """Stop at once: unsaved snapshots are dropped, the worker killed (audits left pending)."""
        if self._writer is not None:  # a finalizer may run on the writer thread itself
            writing = threading.current_thread().name.startswith(_WRITER)
            self._writer.shutdown(wait=not writing, cancel_futures=True)
        if self._attacker is not None:
            self._attacker.abort(why)

    @property
    def _attack_name(self) -> str:
        return self._config.attack or "none"

    def _parts(self, job: Job) -> list[Job]:
        """The audits of `job`: one per module group (one in all when not attacking)."""
        if self._config.attack is None:
            return [job]
        groups = [[m] for m in self._modules] if self._config.separate_modules else [self._modules]
        last = len(groups) - 1
        return [
            dataclasses.replace(job, modules=group, release=i == last)
            for i, group in enumerate(groups)
        ]

    def _save_and_attack(self, snapshot: GradientSnapshot, parts: list[Job]) -> None:
        """Write the report (pending entries first), the snapshot, then attack each part."""
        self._results.write()
        error = save_snapshot(snapshot, parts[0].directory)
        if error is not None:
            for part in parts:
                self._results.add(part.result(self._attack_name, error))
            return
        if self._config.attack is None:
            self._results.add(
                parts[0].result(
                    self._attack_name,
                    "not attacked (capture only, attack is None): attack the snapshot with "
                    f"`gradaudit attack {parts[0].directory} --model ...`",
                )
            )
            return
        for part in parts:
            if self._attacker is not None:
                self._attacker.submit(part)
            else:
                self._results.add(self._attack_inline(part))

    def _attack_inline(self, job: Job) -> AuditResult:
        with preserve_rng():
            if self._attack_model is None:
                try:
                    self._attack_model = rebuild(ModelRecipe.of(self._model))
                except Exception as error:  # noqa: BLE001 - recorded, never raised
                    why = f"cannot rebuild the model: {error}"
                    return job.failed(self._config.attack, why, self._config.keep_snapshots)
            return run_job(self._attack_model, self._tokenizer, self._config, job)
