"""Attacking saved snapshots off the training path: inline, or in a spawned worker process.

An attack's exception, timeout, out-of-memory or a dead worker becomes that audit's `error`;
nothing is raised into the training process.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.scoring.audit import audit_snapshot
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig

_POLL_S = 0.5
WORKER_NAME = "gradaudit-attack-worker"
_READY = "ready"


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
        return job.result(
            config.attack,
            f"out of memory on {config.device}: {error}; lower budget, audit fewer modules or "
            "set device to one with more memory",
        )
    except Exception as error:  # noqa: BLE001 - every attack failure is recorded, never raised
        return job.result(config.attack, f"{type(error).__name__}: {error}")
    result.info = {**result.info, **job.info}
    result.epsilon = job.epsilon
    if job.release and not config.keep_snapshots:
        shutil.rmtree(job.directory, ignore_errors=True)
    return result


def _worker_main(model_class, model_config, tokenizer, config: AuditConfig, jobs, results) -> None:
    """Entry point of the spawned process: build the model once, attack jobs until None."""
    import torch

    torch.set_num_threads(config.worker_threads)
    model = model_class(model_config)  # weights come from each snapshot
    results.put(_READY)
    while (job := jobs.get()) is not None:
        results.put(run_job(model, tokenizer, config, job).to_dict())


class BackgroundAttacker:
    """A spawned worker process fed one job at a time by a dispatcher thread.

    `on_result` is called (from the thread) with each `AuditResult`, failures included.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        config: AuditConfig,
        on_result: Callable[[AuditResult], None],
    ) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._args = (type(model), model.config, tokenizer, config)
        self._config = config
        self._on_result = on_result
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._process = None
        self._process_jobs = None
        self._process_results = None
        self._deadline: float | None = None
        self._thread = threading.Thread(
            target=self._dispatch, name="gradaudit-attacks", daemon=True
        )
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def close(self, timeout_s: float | None = None) -> None:
        """Finish queued jobs; after `timeout_s` the rest are recorded as not attacked."""
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._jobs.put(None)
        self._thread.join()

    def _start(self) -> None:
        self._process_jobs = self._context.Queue()
        self._process_results = self._context.Queue()
        self._process = self._context.Process(
            target=_worker_main,
            args=(*self._args, self._process_jobs, self._process_results),
            name=WORKER_NAME,
            daemon=True,
        )
        self._process.start()

    def _stop(self, kill: bool) -> None:
        if self._process is None:
            return
        if kill:
            self._process.kill()
        else:
            self._process_jobs.put(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._process = None

    def _closing_expired(self) -> bool:
        return self._deadline is not None and time.monotonic() > self._deadline

    def _dispatch(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._closing_expired():
                self._on_result(self._not_attacked(job, "the close timeout passed first"))
                continue
            self._on_result(self._attack(job))
        self._stop(kill=False)

    def _not_attacked(self, job: Job, why: str) -> AuditResult:
        return job.result(
            self._config.attack,
            f"not attacked: {why}; the snapshot is kept, attack it with "
            f"`gradaudit attack {job.directory} --model ...`",
        )

    def _attack(self, job: Job) -> AuditResult:
        starting = self._process is None
        if starting:
            self._start()
        self._process_jobs.put(job)
        deadline = time.monotonic() + self._config.attack_timeout_s
        while True:
            try:
                message = self._process_results.get(timeout=_POLL_S)
            except queue.Empty:
                message = None
            if message == _READY:  # the timeout counts from here, not from the slow start
                deadline = time.monotonic() + self._config.attack_timeout_s
                starting = False
            elif message is not None:
                return AuditResult.from_dict(message)
            elif not self._process.is_alive():
                code = self._process.exitcode
                self._process = None
                return job.result(
                    self._config.attack,
                    f"attack worker died (exit code {code}; -9 is usually the out-of-memory "
                    "killer): lower budget or audit fewer modules; if it died at start, guard "
                    "your training script with `if __name__ == '__main__':` (the worker is "
                    "spawned and re-imports it)",
                )
            elif not starting and time.monotonic() > deadline:
                self._stop(kill=True)
                return job.result(
                    self._config.attack,
                    f"attack timed out after {self._config.attack_timeout_s:g} s: raise "
                    "attack_timeout_s or lower budget",
                )
            elif self._closing_expired():
                self._stop(kill=True)
                return self._not_attacked(job, "the close timeout passed while it ran")


def snapshot_dir(output_dir: str | Path, step: int, contrast: str | None = None) -> Path:
    """Where the snapshot of `step` is saved; its `contrast` gradient (e.g. "raw") beside it."""
    suffix = f"-{contrast}" if contrast else ""
    return Path(output_dir) / "snapshots" / f"step-{step:08d}{suffix}"
