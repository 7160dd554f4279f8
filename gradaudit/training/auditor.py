"""Auditing during training: record each step's batch, snapshot sampled steps, attack them.

The auditor never changes training: it draws from no global RNG, modifies no gradient,
never switches train/eval and copies tensors to the CPU on sampled steps only.
"""

from __future__ import annotations

import dataclasses
import inspect
import multiprocessing
import random
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.capture.snapshot import GradientSnapshot
from gradaudit.errors import GradAuditError
from gradaudit.io import private_dir
from gradaudit.model.batch import BATCH_KEYS, Batch, check_batch, concat_batches
from gradaudit.model.selection import select_modules
from gradaudit.report import build_report, read_report, write_report
from gradaudit.scoring.metrics import SCORE_KEYS
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig
from gradaudit.training.worker import WORKER_NAME, BackgroundAttacker, Job, run_job, snapshot_dir

# Relative slack when telling a clipped total norm (== max_grad_norm) from an unclipped one.
_CLIP_TOLERANCE = 1e-3


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


def check_writable(directory: str | Path) -> Path:
    """Create `directory` privately and prove a file can be written in it."""
    try:
        path = private_dir(directory)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gradaudit-probe-"):
            pass
    except OSError as error:
        raise GradAuditError(
            f"output_dir {directory} is not writable ({error.strerror or error}): "
            "choose a directory you can write to"
        ) from None
    return path


def find_dp_optimizer(optimizer: Any) -> Any:
    """The Opacus DPOptimizer that `optimizer` is or wraps (e.g. accelerate's), else None."""
    # No DPOptimizer exists before opacus is imported: runs without DP never import it.
    if optimizer is None or "opacus" not in sys.modules:
        return None
    from gradaudit.privacy import find_dp_optimizer as find

    return find(optimizer)


def _check_dp_wiring(
    dp_optimizer: Any, privacy_engine: Any, delta: float | None, dataset_size: int | None
) -> None:
    """Refuse a DP run whose audits would attack the wrong gradient or miss ε."""
    if dp_optimizer is None:
        raise GradAuditError(
            "privacy_engine was given but the optimizer is not (and wraps no) Opacus "
            "DPOptimizer, so the audit would attack the raw gradient, not the released one: "
            "pass optimizer= the optimizer PrivacyEngine.make_private returned"
        )
    if privacy_engine is None:
        raise GradAuditError(
            "the optimizer is an Opacus DPOptimizer but no privacy_engine was given, so ε "
            "cannot be reported: pass privacy_engine= the PrivacyEngine that made it private "
            "(or the Opacus accountant attached to it)"
        )
    if delta is None and not dataset_size:
        raise GradAuditError(
            "ε needs δ: pass dataset_size= (δ = 1/N for N training examples) or set "
            "AuditConfig.dp_delta"
        )


def result_metrics(result: AuditResult) -> dict[str, float]:
    """`gradaudit/...` scalars of one finished audit, for a training logger.

    A contrast audit (`AuditConfig.dp_contrast`) logs under `gradaudit/contrast/...`, so the
    unreleased gradient's scores never mix with the released ones.
    """
    prefix = "gradaudit/contrast/" if result.contrast else "gradaudit/"
    metrics = {f"{prefix}audited_step": float(result.step or 0)}
    if result.error is not None:
        metrics[f"{prefix}error"] = 1.0
    for key in SCORE_KEYS:
        value = getattr(result, key)
        if value is not None:
            metrics[f"{prefix}{key}"] = float(value)
    return metrics


def _result_key(result: AuditResult) -> tuple[int | None, tuple[str, ...], str]:
    # A DP step's contrast audit shares step and modules with the released one.
    return (result.step, tuple(result.modules), result.gradient)


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
        gather: Callable[[Batch], list[Batch]] | None = None,
        last_step: int | None = None,
        privacy_engine: Any = None,
        dataset_size: int | None = None,
    ) -> None:
        if multiprocessing.current_process().name == WORKER_NAME:
            raise GradAuditError(
                "the attack worker re-imported a training script that builds an Auditor at top "
                "level: guard the script with `if __name__ == '__main__':` (the worker is spawned)"
            )
        # An Opacus DPOptimizer releases clipped, noised gradients: capture those, not `.grad`
        # after backward (the paper's code attacks the latter).
        self._dp_optimizer = find_dp_optimizer(optimizer)
        if self._dp_optimizer is not None or privacy_engine is not None:
            from gradaudit.privacy import unwrap_model

            model = unwrap_model(model)
            _check_dp_wiring(self._dp_optimizer, privacy_engine, config.dp_delta, dataset_size)
        if config.dp_contrast and self._dp_optimizer is None:
            raise GradAuditError(
                "dp_contrast audits the raw gradient behind a DP-SGD release, but the optimizer "
                "is not (and wraps no) Opacus DPOptimizer: pass optimizer= the optimizer "
                "PrivacyEngine.make_private returned, or set dp_contrast=False"
            )
        self.model = model
        self.config = config
        self.privacy_engine = privacy_engine
        self.dataset_size = dataset_size
        self.tokenizer = tokenizer
        self.modules = select_modules(model, config.modules)
        self.max_grad_norm = max_grad_norm
        self.is_main_process = is_main_process
        self._gather = gather
        if is_main_process and config.attack is not None and tokenizer is None:
            raise GradAuditError(
                f"attack {config.attack!r} needs the tokenizer: pass tokenizer=, or set "
                "attack=None to only save snapshots"
            )
        if (
            optimizer is not None
            and self._dp_optimizer is None
            and not hasattr(optimizer, "register_step_pre_hook")
        ):
            raise GradAuditError(
                f"optimizer {type(optimizer).__name__} has no register_step_pre_hook: use a "
                "torch.optim.Optimizer (torch >= 2.0), or pass no optimizer and call "
                "auditor.before_step() before each optimizer.step()"
            )
        if is_main_process:
            check_writable(config.output_dir)
        why = config.selects_nothing(last_step)
        if why is not None:
            warnings.warn(
                f"gradaudit: the sampling options select no step ({why}); no audit will run: "
                "set every_n_steps, steps or probability",
                stacklevel=2,
            )
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._step = 0
        self._audits = 0
        self._audited_steps: list[int] = []
        self._results: dict[int, AuditResult] = {}
        self._unseen: list[AuditResult] = []
        self._batches: list[Batch] = []
        self._checked = False
        self._next: tuple[int, bool] = (0, False)
        self._lock = threading.Lock()
        self._attack_model: nn.Module | None = None
        self._closed = False
        self._hooks = [model.register_forward_pre_hook(self._record, with_kwargs=True)]
        if self._dp_optimizer is not None:
            from gradaudit.privacy import watch_released_gradients

            self._hooks.append(watch_released_gradients(self._dp_optimizer, self.before_step))
        elif optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._step_pre_hook))
        # Background mode writes snapshots from a thread of its own, off the training step.
        self._writer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradaudit-writer")
            if is_main_process and config.background
            else None
        )
        self._attacker = None
        if is_main_process and config.attack is not None and config.background:
            self._attacker = BackgroundAttacker(model, tokenizer, config, self._add_result)

    # -- state (resume) -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Counters to checkpoint, so a resumed run keeps counting steps and audits."""
        return {"step": self._step, "audits": self._audits, "audited_steps": self._audited_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters; audits of earlier steps are read back from the old report."""
        self._step = int(state["step"])
        self._audited_steps = [s for s in state["audited_steps"] if s <= self._step]
        self._audits = len(self._audited_steps)
        report = Path(self.config.output_dir) / "report.json"
        if not self.is_main_process or not self._audited_steps or not report.is_file():
            return
        for audit in read_report(self.config.output_dir)["audits"]:
            if audit["step"] in self._audited_steps:
                result = AuditResult.from_dict(audit)
                self._results[_result_key(result)] = result

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self._step

    @property
    def dp_optimizer(self) -> Any:
        """The Opacus DPOptimizer whose released gradients are audited, or None.

        Its steps are taken by the auditor's own hook, so adapters must not call
        `before_step()` for them.
        """
        return self._dp_optimizer

    @property
    def results(self) -> list[AuditResult]:
        """Finished audits, by step."""
        with self._lock:
            return [self._results[k] for k in sorted(self._results)]

    def new_results(self) -> list[AuditResult]:
        """Audits finished since the last call (for logging them once)."""
        with self._lock:
            unseen, self._unseen = self._unseen, []
        return unseen

    # -- hooks ----------------------------------------------------------------------------

    def _sampled(self, step: int) -> bool:
        if self._next[0] != step:
            self._next = (step, self.config.is_sampled(step, self._audits))
        return self._next[1]

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._closed or not torch.is_grad_enabled():
            return  # evaluation forwards are not training batches
        if not self._checked or self._sampled(self._step + 1):
            inputs = {**dict(zip(self._forward_params, args)), **kwargs}
            tensors = {k: inputs[k] for k in BATCH_KEYS if torch.is_tensor(inputs.get(k))}
            check_batch(tensors)
            self._checked = True
            if self._sampled(self._step + 1):
                self._batches.append(
                    {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
                )

    def _step_pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.before_step()

    def before_step(self, step: int | None = None) -> None:
        """Take the gradients of step `step` (default: the next one) if it is sampled."""
        step = self._step + 1 if step is None else step
        try:
            if not self._closed and self._sampled(step):
                self._capture(step)
        finally:
            self._step = step
            self._batches = []

    # -- capture and attack ---------------------------------------------------------------

    def _gradient_kind(self) -> tuple[str, dict[str, float]]:
        if not self.max_grad_norm or self.max_grad_norm <= 0:
            return "raw", {}
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        norm = float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        )
        clipped = norm >= self.max_grad_norm * (1 - _CLIP_TOLERANCE)
        return ("clipped" if clipped else "raw"), {
            "grad_norm": norm,
            "max_grad_norm": self.max_grad_norm,
        }

    def _capture(self, step: int) -> None:
        pad = getattr(self.model.config, "pad_token_id", None) or 0
        ranks = 1
        batch = concat_batches(self._batches, pad) if self._batches else None
        if self._gather is not None:  # every rank takes part, so no rank waits forever
            gathered = [b for b in self._gather(batch) if b is not None]
            batch = concat_batches(gathered, pad) if gathered else None
            ranks = len(gathered)
        if self._dp_optimizer is not None:
            from gradaudit.privacy import step_batch_size

            if step_batch_size(self._dp_optimizer) == 0:
                return  # an empty Poisson batch releases pure noise: skipped, not audited
        self._audits += 1  # on every rank, so all ranks keep sampling the same steps
        self._audited_steps.append(step)
        if not self.is_main_process:
            return
        released = Job(
            step=step,
            directory=str(snapshot_dir(self.config.output_dir, step)),
            modules=self.modules,
            batch_size=0 if batch is None else int(batch["input_ids"].shape[0]),
            gradient="raw" if self._dp_optimizer is None else "noised",
            info={"micro_batches": len(self._batches), "ranks": ranks},
        )
        jobs = [released]
        if self.config.dp_contrast:  # only with a DPOptimizer (checked in __init__)
            jobs.append(
                dataclasses.replace(
                    released,
                    directory=str(snapshot_dir(self.config.output_dir, step, "raw")),
                    gradient="raw",
                    info={**released.info, "contrast": True},
                )
            )
        attack = self.config.attack or "none"
        if batch is None:
            for job in jobs:
                self._add_result(
                    job.result(
                        attack,
                        "no training forward was recorded for this step: build the auditor "
                        "before the first forward of the step",
                    )
                )
            return
        epsilon = self.epsilon()
        weights = None
        for job in jobs:
            try:
                snapshot = self._snapshot(batch, step, job, weights)
            except Exception as error:  # noqa: BLE001 - a failed capture is recorded, never raised
                message = f"capture failed: {type(error).__name__}: {error}"
                self._add_result(job.result(attack, message))
                continue
            weights = snapshot.weights
            job.epsilon = epsilon
            if self._writer is not None:  # the tensors are copied; writing them can wait
                self._writer.submit(self._save_and_attack, snapshot, job)
            else:
                self._save_and_attack(snapshot, job)

    def _save_and_attack(self, snapshot: GradientSnapshot, job: Job) -> None:
        """Write the snapshot, then attack each module group (inline or in the worker)."""
        attack = self.config.attack or "none"
        try:
            snapshot.save(job.directory)
        except Exception as error:  # noqa: BLE001 - a failed save is recorded, never raised
            self._add_result(job.result(attack, f"saving failed: {type(error).__name__}: {error}"))
            return
        if self.config.attack is None:
            self._add_result(
                job.result(
                    attack,
                    "not attacked (capture only, attack is None): attack the snapshot with "
                    f"`gradaudit attack {job.directory} --model ...`",
                )
            )
            return
        groups = [[m] for m in self.modules] if self.config.separate_modules else [self.modules]
        for i, group in enumerate(groups):
            part = dataclasses.replace(job, modules=group, release=i == len(groups) - 1)
            if self._attacker is not None:
                self._attacker.submit(part)
            else:
                self._add_result(self._attack_inline(part))

    def _snapshot(
        self, batch: Batch, step: int, job: Job, weights: dict[str, torch.Tensor] | None = None
    ) -> GradientSnapshot:
        """Copy `job.gradient` of `step` and the weights that produced it to the CPU.

        `weights` already copied for this step (by its other snapshot) are shared, not copied
        again on the training path.
        """
        if self._dp_optimizer is not None:
            from gradaudit.privacy import dp_snapshot

            snapshot = dp_snapshot(
                self.model, self._dp_optimizer, batch, self.modules,
                kind=job.gradient, step=step, include_weights=weights is None,
            )  # fmt: skip
        else:
            job.gradient, norms = self._gradient_kind()
            job.info.update(norms)
            snapshot = GradientSnapshot.from_grads(
                self.model, batch, self.modules,
                kind=job.gradient, step=step, include_weights=weights is None,
            )  # fmt: skip
        if weights is not None:
            snapshot.weights = weights
        snapshot.meta = {**snapshot.meta, **job.info}
        return snapshot

    def _delta(self) -> float | None:
        if self.config.dp_delta is not None:
            return self.config.dp_delta
        return 1.0 / self.dataset_size if self.dataset_size else None

    def epsilon(self) -> float | None:
        """ε spent so far by the privacy engine's own accountant (None without one or δ)."""
        delta = self._delta()
        if self.privacy_engine is None or delta is None:
            return None
        from gradaudit.privacy import engine_epsilon

        return engine_epsilon(self.privacy_engine, delta)

    def privacy(self) -> dict[str, Any] | None:
        """The engine's privacy statement (ε and its assumptions in words), when known."""
        delta = self._delta()
        if self.privacy_engine is None or delta is None:
            return None
        from gradaudit.privacy import engine_statement

        clip = getattr(self._dp_optimizer, "max_grad_norm", None)
        return engine_statement(
            self.privacy_engine, delta, clip=clip, dataset_size=self.dataset_size
        )

    def _attack_inline(self, job: Job) -> AuditResult:
        with preserve_rng():
            if self._attack_model is None:  # weights come from the snapshot; no hooks on it
                try:
                    self._attack_model = type(self.model)(self.model.config)
                except Exception as error:  # noqa: BLE001 - recorded, never raised
                    return job.result(self.config.attack, f"cannot rebuild the model: {error}")
            return run_job(self._attack_model, self.tokenizer, self.config, job)

    def _add_result(self, result: AuditResult) -> None:
        with self._lock:
            self._results[_result_key(result)] = result
            self._unseen.append(result)
            self._write_report()

    def _write_report(self) -> Path:
        audits = [self._results[k] for k in sorted(self._results)]
        privacy = self.privacy()
        report = build_report(
            audits,
            config=self.config.to_dict(),
            redact=self.config.redact,
            epsilon=None if privacy is None else privacy["epsilon"],
            privacy=privacy,
        )
        return write_report(self.config.output_dir, report)

    # -- closing --------------------------------------------------------------------------

    def close(self) -> Path | None:
        """Stop recording, wait for pending attacks (`close_timeout_s`), write the report.

        Returns the report path on the main process, None elsewhere.
        """
        if not self._closed:
            self._closed = True
            for hook in self._hooks:
                hook.remove()
            self._batches = []
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            if self._attacker is not None:
                self._attacker.close(self.config.close_timeout_s)
        if not self.is_main_process:
            return None
        with self._lock:
            return self._write_report()

    def __enter__(self) -> Auditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
