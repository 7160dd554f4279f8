"""Attacking one saved snapshot (`run_job`), inline or in the spawned worker process.

An attack's exception, out-of-memory, or an attack that attacked nothing becomes that audit's
`error`; nothing is raised into the training process. The worker (`worker_main`) exits on its
own when the training process dies, settling the audits that process left pending.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.loading import ModelRecipe, rebuild
from gradaudit.scoring.audit import audit_snapshot
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig
from gradaudit.training.results import settle_report, snapshot_fate

POLL_S = 0.2
WORKER_NAME = "gradaudit-attack-worker"
READY = "ready"
ORPHANED = "the training process died before its attack finished (killed by a signal?)"


@dataclass
class Job:
    """One saved snapshot waiting for its attack, with what an error result needs."""

    step: int
    directory: str
    modules: list[str]
    batch_size: int
    gradient: str
    info: dict[str, Any] = field(default_factory=dict)
    epsilon: float | None = None
    # The step's last job deletes the shared snapshot directory (unless keep_snapshots).
    release: bool = True

    def result(self, attack: str, error: str) -> AuditResult:
        """A result without scores; `error` says why."""
        return AuditResult.failure(
            self.modules,
            attack,
            self.batch_size,
            error,
            gradient=self.gradient,
            step=self.step,
            epsilon=self.epsilon,
            info={**self.info, "snapshot": self.directory},
        )

    def failed(self, attack: str, why: str, keep: bool) -> AuditResult:
        """The result of an attack that failed: the step's last job deletes the snapshot,
        which holds the batch's text, unless `keep` (keep_snapshots)."""
        return self.result(
            attack, why + snapshot_fate(self.directory if self.release else None, keep)
        )


def run_job(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: AuditConfig, job: Job
) -> AuditResult:
    """Attack the snapshot of `job`; any failure is returned as the result's error."""
    import torch

    try:
        snapshot = GradientSnapshot.load(job.directory, model).restrict(job.modules)
        result = audit_snapshot(
            model,
            tokenizer,
            snapshot,
            config.attack,
            seed=config.seed + job.step,
            device=config.device,
            budget=config.budget,
            **config.attack_options,
        )
    except (torch.OutOfMemoryError, MemoryError) as error:
        return job.failed(
            config.attack,
            f"out of memory on {config.device}: {error}; lower budget, audit fewer modules or "
            "set device to one with more memory",
            config.keep_snapshots,
        )
    except Exception as error:  # noqa: BLE001 - every attack failure is recorded, never raised
        return job.failed(config.attack, f"{type(error).__name__}: {error}", config.keep_snapshots)
    result.info = {**result.info, **job.info}
    result.epsilon = job.epsilon
    if job.release and not config.keep_snapshots:
        shutil.rmtree(job.directory, ignore_errors=True)
    return result


def _parent_gone(sentinel: int | None, parent_pid: int) -> bool:
    """Wait up to POLL_S for the parent's death: its pipe closed, or this process adopted."""
    if sentinel is None:
        time.sleep(POLL_S)
    elif wait([sentinel], timeout=POLL_S):
        return True
    return os.getppid() != parent_pid


def _exit_with_parent(config: AuditConfig) -> None:
    """Exit as soon as the training process dies, settling the audits it left pending."""
    parent = multiprocessing.parent_process()
    sentinel = None if parent is None else parent.sentinel
    parent_pid = os.getppid()

    def watch() -> None:
        while not _parent_gone(sentinel, parent_pid):
            pass
        try:
            settle_report(config.output_dir, ORPHANED, config.keep_snapshots)
        finally:
            os._exit(0)

    threading.Thread(target=watch, name="gradaudit-parent-watch", daemon=True).start()


def worker_main(recipe: ModelRecipe, tokenizer, config: AuditConfig, jobs, results) -> None:
    """Entry point of the spawned process: build the model once, attack jobs until None."""
    _exit_with_parent(config)
    import torch
    from tqdm import tqdm

    # tqdm's default lock is a named semaphore: a worker killed at a timeout would leave it
    # for the resource tracker to warn about when training exits. One process: a thread lock.
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(config.worker_threads)
    model = rebuild(recipe)
    results.put(READY)
    while (job := jobs.get()) is not None:
        results.put(run_job(model, tokenizer, config, job).to_dict())


def snapshot_dir(output_dir: str | Path, step: int, contrast: str | None = None) -> Path:
    """Where the snapshot of `step` is saved; its `contrast` gradient (e.g. "raw") beside it."""
    suffix = f"-{contrast}" if contrast else ""
    return Path(output_dir) / "snapshots" / f"step-{step:08d}{suffix}"
