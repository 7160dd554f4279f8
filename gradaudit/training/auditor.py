"""Auditing during training: record each step's batch, snapshot sampled steps, attack them.

The auditor never changes training: it draws from no global RNG, modifies no gradient,
never switches train/eval, copies tensors to the CPU on sampled steps only, and raises
nothing into a training step (a failure becomes that audit's error). It wires a
`BatchRecorder` (batches and sampling), a gradient source (`.grad` or a DP-SGD release), a
`Dispatcher` (saving and attacking) and a `ResultStore` (results and the report).

Not closed when the process exits (training raised) or when collected, it stops at once:
the worker is killed, audits still pending are recorded as not attacked, their snapshots
deleted (unless keep_snapshots), and the report written.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit handler is registered before ours (runs after)
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.batch import Batch
from gradaudit.model.selection import select_modules
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig
from gradaudit.training.dispatch import Dispatcher
from gradaudit.training.mainguard import unguarded_main_line, unguarded_message
from gradaudit.training.recorder import BatchRecorder, Gather
from gradaudit.training.results import ResultStore, check_writable, deliver, is_pending
from gradaudit.training.sources import GradientSource, gradient_source
from gradaudit.training.worker import WORKER_NAME, Job, snapshot_dir


def _check_settings(
    config: AuditConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    is_main_process: bool,
    last_step: int | None,
) -> None:
    """Refuse what would fail at the first audit; warn when no step can be audited."""
    if is_main_process and config.attack is not None and tokenizer is None:
        raise GradAuditError(
            f"attack {config.attack!r} needs the tokenizer: pass tokenizer=, or set "
            "attack=None to only save snapshots"
        )
    if is_main_process and config.background and config.attack is not None:
        unguarded = unguarded_main_line()  # the spawned worker would run the training again
        if unguarded is not None:
            raise GradAuditError(unguarded_message(unguarded))
    if is_main_process:
        check_writable(config.output_dir)
    why = config.selects_nothing(last_step)
    if why is not None:
        warnings.warn(
            f"gradaudit: the sampling options select no step ({why}); no audit will run: "
            "set every_n_steps, steps or probability",
            stacklevel=3,  # the caller of Auditor()
        )


ABANDONED = (
    "the auditor was not closed before the process exited or dropped it (training raised, "
    "or close() was never called)"
)


def _abandon(recorder: BatchRecorder, dispatch: Dispatcher | None, results: ResultStore) -> None:
    """Stop an auditor that was not closed: kill the worker, settle its audits, write."""
    recorder.close()
    if dispatch is not None:
        dispatch.abort(ABANDONED)
        results.settle(ABANDONED)
        if results.write_error is not None:  # one more try: the disk may have room again
            results.write()


def _refuse_in_worker() -> None:
    if multiprocessing.current_process().name == WORKER_NAME:
        raise GradAuditError(
            "the attack worker re-imported a training script that builds an Auditor at top "
            "level: guard the script with `if __name__ == '__main__':` (the worker is spawned)"
        )


def step_jobs(
    config: AuditConfig,
    modules: list[str],
    kind: str,
    step: int,
    batch: Batch | None,
    info: dict[str, Any],
) -> list[Job]:
    """The audit of `step`'s `kind` gradient; with `dp_contrast` the raw gradient's beside it.

    (`dp_contrast` is refused without a DPOptimizer, whose release is the `kind` then.)
    """
    released = Job(
        step=step,
        directory=str(snapshot_dir(config.output_dir, step)),
        modules=modules,
        batch_size=0 if batch is None else int(batch["input_ids"].shape[0]),
        gradient=kind,
        info=info,
    )
    if not config.dp_contrast:
        return [released]
    contrast = dataclasses.replace(
        released,
        directory=str(snapshot_dir(config.output_dir, step, "raw")),
        gradient="raw",
        info={**info, "contrast": True},
    )
    return [released, contrast]


def take_snapshot(
    source: GradientSource,
    modules: list[str],
    batch: Batch,
    job: Job,
    weights: dict[str, torch.Tensor] | None,
    precision: dict[str, torch.dtype],
) -> tuple[GradientSnapshot, Job]:
    """Copy `job.gradient` of `job.step` and the weights that produced it to the CPU, at the
    precision each module computed in; the job with its labels and that precision.

    `weights` already copied for this step (by its other snapshot) are shared, not copied
    again on the training path.
    """
    gradient, labels = source.label(job.gradient)
    job = dataclasses.replace(job, gradient=gradient, info={**job.info, **labels})
    snapshot = source.snapshot(batch, modules, job.gradient, job.step, weights is None)
    if weights is not None:
        snapshot.weights = weights
    snapshot.meta = {**snapshot.meta, **job.info}
    job.info["precision"] = source.at_precision(snapshot, precision)
    return snapshot, job


class Auditor:
    """Audits sampled optimizer steps of a training loop; `close()` writes the report.

    With `optimizer`, gradients are taken in its step pre-hook (after all-reduce, unscaling
    and clipping); without, call `before_step()` right before `optimizer.step()`.
    Adapters pass `max_grad_norm` (to label clipped gradients), `is_main_process` (only the
    main process saves, attacks and writes) and `gather` (one batch in, every rank's out).
    With an Opacus DPOptimizer (or a wrapper of one) as `optimizer`, the gradient it releases
    is audited ("noised"); pass `privacy_engine` and `dataset_size` (or `config.dp_delta`)
    for ε. With `config.dp_contrast`, the raw gradient behind each audited release is
    audited too ("raw", marked `info["contrast"]`).
    `on_result` (for loggers) is called on the training thread with each finished audit,
    after the step that found it finished and at `close()`; `new_results()` then has none.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AuditConfig,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        max_grad_norm: float | None = None,
        is_main_process: bool = True,
        gather: Gather | None = None,
        last_step: int | None = None,
        privacy_engine: Any = None,
        dataset_size: int | None = None,
        on_result: Callable[[AuditResult], None] | None = None,
    ) -> None:
        _refuse_in_worker()
        config = config.for_run(last_step)  # an unset output_dir and default sampling filled
        # An Opacus DPOptimizer releases clipped, noised gradients: capture those, not `.grad`
        # after backward (the paper's code attacks the latter).
        self._source = gradient_source(
            model, config, optimizer=optimizer, max_grad_norm=max_grad_norm,
            privacy_engine=privacy_engine, dataset_size=dataset_size,
        )  # fmt: skip
        self.model = model = self._source.model
        self.config = config
        self.tokenizer = tokenizer
        self.privacy_engine = privacy_engine
        self.dataset_size = dataset_size
        self.max_grad_norm = max_grad_norm
        self.is_main_process = is_main_process
        self.modules = select_modules(model, config.modules)
        _check_settings(config, tokenizer, is_main_process, last_step)
        self._gather = gather
        self._on_result = on_result
        self._closed = False
        self._results = ResultStore(config, self._source.privacy)
        self._dispatch = None
        if is_main_process:
            self._dispatch = Dispatcher(model, tokenizer, config, self.modules, self._results)
        self._recorder = BatchRecorder(model, config, self.modules)
        self._recorder.hold(self._source.watch(self.before_step))
        # Holds no reference to the auditor; runs at exit before multiprocessing's handler.
        self._finalizer = weakref.finalize(
            self, _abandon, self._recorder, self._dispatch, self._results
        )
        self._finalizer.atexit = False
        atexit.register(self._finalizer)

    # -- state (resume) -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters to checkpoint, so a resumed run keeps counting steps and audits."""
        return self._recorder.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters; audits of earlier steps are read back from the old report."""
        self._recorder.load_state_dict(state)
        if self.is_main_process:
            self._results.reload(self._recorder.audited_steps, self._failure)

    def _failure(self, step: int, error: str) -> AuditResult:
        """The audit of `step` (every module, not attacked) with `error`."""
        attack = self.config.attack or "none"
        return AuditResult.failure(
            self.modules, attack, 0, error, gradient=self._source.kind, step=step
        )

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self._recorder.step

    @property
    def dp_optimizer(self) -> Any:
        """The Opacus DPOptimizer whose released gradients are audited, or None.

        Its steps are taken by the auditor's own hook, so adapters must not call
        `before_step()` for them.
        """
        return self._source.dp_optimizer

    @property
    def results(self) -> list[AuditResult]:
        """Finished audits, by step (pending ones left out)."""
        return [r for r in self._results.all() if not is_pending(r.error)]

    def new_results(self) -> list[AuditResult]:
        """Audits finished since the last call (for logging them once)."""
        return self._results.take_unseen()

    def epsilon(self) -> float | None:
        """ε spent so far by the privacy engine's own accountant (None without one or δ)."""
        return self._source.epsilon()

    def privacy(self) -> dict[str, Any] | None:
        """The engine's privacy statement (ε and its assumptions in words), when known."""
        return self._source.privacy()

    # -- steps ----------------------------------------------------------------------------

    def before_step(self, step: int | None = None) -> None:
        """Take the gradients of step `step` (default: the next one) if it is sampled."""
        step = self._recorder.step + 1 if step is None else step
        try:
            if not self._closed and self._recorder.sampled(step):
                self._capture(step)
        except Exception as error:  # noqa: BLE001 - the auditor never breaks a training step
            if self._dispatch is not None:
                self._results.add(self._failure(step, f"{type(error).__name__}: {error}"))
        finally:
            self._recorder.advance(step)
        self._deliver()

    def _capture(self, step: int) -> None:
        pad = getattr(self.model.config, "pad_token_id", None) or 0
        batch, info = self._recorder.step_batch(pad, self._gather)
        if self._source.releases_nothing():
            return  # e.g. an empty Poisson batch releases pure noise: skipped, not audited
        self._recorder.count_audit(step)
        if self._dispatch is None:  # not the main process
            return
        jobs = step_jobs(self.config, self.modules, self._source.kind, step, batch, info)
        if batch is None:
            why = self._recorder.problem or (
                "no training forward was recorded for this step: build the auditor before the "
                "first forward of the step"
            )
            for job in jobs:
                self._results.add(job.result(self.config.attack or "none", why))
            return
        self._capture_jobs(batch, jobs)

    def _capture_jobs(self, batch: Batch, jobs: list[Job]) -> None:
        """Snapshot each job's gradient (the weights copied once) and hand it on."""
        epsilon = self.epsilon()
        weights = None
        for job in jobs:
            try:
                snapshot, job = take_snapshot(
                    self._source, self.modules, batch, job, weights, self._recorder.precision
                )
            except Exception as error:  # noqa: BLE001 - a failed capture is recorded, never raised
                message = f"capture failed: {type(error).__name__}: {error}"
                self._results.add(job.result(self.config.attack or "none", message))
                continue
            weights = snapshot.weights
            self._dispatch.submit(snapshot, dataclasses.replace(job, epsilon=epsilon))

    def _deliver(self) -> None:
        if self._on_result is not None:
            deliver(self.new_results(), self._on_result)

    # -- closing --------------------------------------------------------------------------

    def close(self) -> Path | None:
        """Stop recording, wait for pending attacks (`close_timeout_s`), write the report.

        Returns the report path on the main process (None elsewhere, or when the report
        could not be written: that is warned about). Never raises; interrupted (Ctrl-C), the
        exit handler finishes the job.
        """
        if not self._closed:
            self._closed = True
            self._recorder.close()
            if self._dispatch is not None:
                self._dispatch.close(self.config.close_timeout_s)
                self._results.settle("its outcome never came back")  # none should be left
            self._finalizer.detach()
            atexit.unregister(self._finalizer)
        path = self._results.write() if self.is_main_process else None
        self._deliver()
        return path

    def __enter__(self) -> Auditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
