"""`BackgroundAttacker`: one spawned worker process, fed one job at a time by a thread.

Its lifecycle is bounded at every stage: the worker must be ready within `start_timeout_s`
(else it is killed, and later jobs are not attacked rather than waiting again), each attack
may take `attack_timeout_s`, `close()` waits at most `close_timeout_s`, `abort()` stops at
once, and the worker exits by itself when the training process dies. Every job ends as a
result (scores or a named error), except after `abort()`: the jobs left then stay pending
for the auditor to settle.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.model.loading import ModelRecipe
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig
from gradaudit.training.worker import POLL_S, READY, WORKER_NAME, Job, worker_main

_STOP_S = 10.0  # how long a worker that was asked to stop may take before it is killed


class _Worker:
    """The spawned process and its job and result queues."""

    def __init__(self, context: Any, args: tuple) -> None:
        self.jobs = context.Queue()
        self.results = context.Queue()
        self.process = context.Process(
            target=worker_main,
            args=(*args, self.jobs, self.results),
            name=WORKER_NAME,
            daemon=True,
        )
        self.process.start()

    def message(self) -> Any:
        """The worker's next message within POLL_S, or None."""
        try:
            return self.results.get(timeout=POLL_S)
        except queue.Empty:
            return None

    def stop(self, kill: bool) -> None:
        """Kill the worker, or ask it to finish (killed if it takes over _STOP_S)."""
        if self.process.is_alive():
            if kill:
                self.process.kill()
            else:
                self.jobs.put(None)
            self.process.join(timeout=_STOP_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=_STOP_S)
        for channel in (self.jobs, self.results):  # never wait on a dead reader at exit
            channel.cancel_join_thread()
            channel.close()


class BackgroundAttacker:
    """Attacks jobs in a spawned worker; `on_result` gets each outcome (from its thread)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        config: AuditConfig,
        on_result: Callable[[AuditResult], None],
    ) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._args = (ModelRecipe.of(model), tokenizer, config)
        self._config = config
        self._on_result = on_result
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker: _Worker | None = None
        self._broken: str | None = None  # why the worker cannot start: no job waits again
        self._deadline: float | None = None  # when close() stops waiting
        self._aborted: str | None = None
        self._thread = threading.Thread(target=self._run, name="gradaudit-attacks", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def close(self, timeout_s: float | None = None) -> None:
        """Finish queued jobs; after `timeout_s` the rest are recorded as not attacked."""
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._jobs.put(None)
        # Joined in slices: a Ctrl-C that the kernel hands to another thread only sets a flag,
        # which the main thread acts on when it next runs Python code, never inside one wait.
        while self._thread.is_alive():
            self._thread.join(timeout=POLL_S)

    def abort(self, why: str) -> None:
        """Stop now: kill the worker; jobs not finished are left unrecorded (pending)."""
        self._aborted = why
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:  # (a finalizer may run anywhere)
            self._thread.join(timeout=_STOP_S)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._aborted is not None:
                continue  # left pending: the auditor settles it
            try:
                result = self._attack(job)
            except Exception as error:  # noqa: BLE001 - recorded, never raised
                result = self._failed(job, f"{type(error).__name__}: {error}")
            if result is not None:
                self._on_result(result)
        if self._worker is not None:
            self._worker.stop(kill=self._aborted is not None)
            self._worker = None

    def _interrupted(self) -> str | None:
        """Why waiting must stop now: an abort, or the close timeout passed."""
        if self._aborted is not None:
            return self._aborted
        if self._deadline is not None and time.monotonic() > self._deadline:
            return "the close timeout (close_timeout_s) passed first"
        return None

    def _wait(self, worker: _Worker, timeout_s: float) -> tuple[str, Any]:
        """The worker's next message within `timeout_s`: ("message", it), ("dead", exit code),
        ("timeout", None) or ("interrupted", why)."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = worker.message()
            if message is not None:
                return "message", message
            if not worker.process.is_alive():
                return "dead", worker.process.exitcode
            why = self._interrupted()
            if why is not None:
                return "interrupted", why
            if time.monotonic() > deadline:
                return "timeout", None

    def _ready(self) -> str | None:
        """Start the worker unless it runs; why it cannot attack now, or None."""
        if self._worker is not None or self._broken is not None:
            return self._broken
        worker = _Worker(self._context, self._args)
        status, value = self._wait(worker, self._config.start_timeout_s)
        if status == "message" and value == READY:
            self._worker = worker
            return None
        worker.stop(kill=True)
        if status == "interrupted":
            return value
        if status == "timeout":
            self._broken = (
                f"the attack worker was not ready within start_timeout_s="
                f"{self._config.start_timeout_s:g} s (building the model in a fresh process "
                "hung or is slow): raise start_timeout_s, or set background=False"
            )
        else:
            self._broken = (
                f"the attack worker died while starting (exit code {value}; its traceback is "
                "on standard error): if it ran your training script again, guard the script "
                "with `if __name__ == '__main__':` (the worker is spawned and re-imports it), "
                "else set background=False to attack inline"
            )
        return self._broken

    def _attack(self, job: Job) -> AuditResult | None:
        why = self._interrupted() or self._ready()
        if why is not None:
            return self._not_attacked(job, why)
        worker = self._worker
        worker.jobs.put(job)
        status, value = self._wait(worker, self._config.attack_timeout_s)
        if status == "message":
            return AuditResult.from_dict(value)
        worker.stop(kill=True)
        self._worker = None
        if status == "interrupted":
            return self._not_attacked(job, value)
        if status == "timeout":
            return self._failed(
                job,
                f"attack timed out after {self._config.attack_timeout_s:g} s: raise "
                "attack_timeout_s or lower budget",
            )
        return self._failed(
            job,
            f"attack worker died (exit code {value}; -9 is usually the out-of-memory killer): "
            "lower budget or audit fewer modules",
        )

    def _not_attacked(self, job: Job, why: str) -> AuditResult | None:
        if self._aborted is not None:
            return None  # pending: settled by the auditor
        return self._failed(job, f"not attacked: {why}")

    def _failed(self, job: Job, why: str) -> AuditResult:
        return job.failed(self._config.attack, why, self._config.keep_snapshots)
