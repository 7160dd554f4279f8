"""Audits of a training run, the report they make, and their metrics for loggers.

The `ResultStore` is the one place results are kept and written. Every audited step has an
entry from the moment it is captured: `pending` until its outcome (scores or a named error)
replaces it, so no audit vanishes when the process dies. Writing the report never raises
into training: a failure is recorded (`write_error`) and warned about.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gradaudit.errors import GradAuditError
from gradaudit.io import describe_os_error, private_dir
from gradaudit.report import build_report, read_report, write_report
from gradaudit.report.format import SNAPSHOT_KEPT
from gradaudit.scoring.metrics import SCORE_KEYS
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig

# (step, modules, gradient): a DP step's contrast audit shares step and modules with the
# released one.
ResultKey = tuple[int | None, tuple[str, ...], str]
PENDING = (
    "pending: its attack had not finished when this report was written (if training has "
    "ended, its process was killed first)"
)
_FIELDS = {f.name for f in dataclasses.fields(AuditResult)}


def result_key(result: AuditResult) -> ResultKey:
    return (result.step, tuple(result.modules), result.gradient)


def is_pending(error: str | None) -> bool:
    """Whether an audit's `error` says its outcome has not come yet."""
    return error is not None and error.startswith("pending:")


def snapshot_fate(snapshot: str | None, keep: bool) -> str:
    """Delete `snapshot` (it holds the batch's text) unless `keep`; what became of it, as the
    tail of an audit's error ("" without a snapshot)."""
    if not snapshot:
        return ""
    if keep:
        return (
            f"; {SNAPSHOT_KEPT} (keep_snapshots): attack it with "
            f"`gradaudit attack {snapshot} --model ...`"
        )
    shutil.rmtree(snapshot, ignore_errors=True)
    return "; its snapshot was deleted (keep_snapshots=True keeps it)"


def settle_error(why: str, snapshot: str | None, keep: bool) -> str:
    """The error of an audit that will never be attacked; its snapshot deleted unless `keep`."""
    return f"not attacked: {why}{snapshot_fate(snapshot, keep)}"


def settle_report(output_dir: str | Path, why: str, keep: bool) -> None:
    """Settle the pending audits of `output_dir/report.json` written by a process now dead."""
    try:
        report = json.loads((Path(output_dir) / "report.json").read_text(encoding="utf-8"))
        audits = [a for a in report["audits"] if is_pending(a.get("error"))]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no report (or not ours): nothing recorded, nothing to settle
    for audit in audits:
        audit["error"] = settle_error(why, (audit.get("info") or {}).get("snapshot"), keep)
    if audits:
        write_report(output_dir, report)


def deliver(results: Iterable[AuditResult], callback: Callable[[AuditResult], Any]) -> None:
    """Pass each result to `callback` (a logger); its failure is warned about, never raised
    into training (report.json holds every audit anyway)."""
    for result in results:
        try:
            callback(result)
        except Exception as error:  # noqa: BLE001 - logging an audit never stops training
            warnings.warn(
                f"gradaudit: logging the audit of step {result.step} failed: "
                f"{type(error).__name__}: {error} (report.json holds it)",
                RuntimeWarning,
                stacklevel=3,
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


def check_writable(directory: str | Path) -> Path:
    """Create `directory` privately (0700, also when it exists) and prove a file fits in it."""
    try:
        path = private_dir(directory, tighten=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gradaudit-probe-"):
            pass
    except OSError as error:
        raise GradAuditError(
            f"output_dir {directory} is not writable ({error.strerror or error}): "
            "choose a directory you can write to"
        ) from None
    return path


class ResultStore:
    """Audits by (step, modules, gradient), thread-safe; the report is rewritten on each one.

    `privacy()` gives the privacy statement the report carries (ε and its assumptions).
    """

    def __init__(self, config: AuditConfig, privacy: Callable[[], dict[str, Any] | None]) -> None:
        self._config = config
        self._privacy = privacy
        self._lock = threading.Lock()
        self._results: dict[ResultKey, AuditResult] = {}
        self._unseen: list[AuditResult] = []
        self._warned: set[str] = set()
        self.write_error: str | None = None  # why the last report write failed, if it did

    def add(self, result: AuditResult) -> None:
        """Store an audit's outcome (from any thread) and rewrite the report."""
        with self._lock:
            self._results[result_key(result)] = result
            self._unseen.append(result)
            self._write()

    def add_pending(self, results: Iterable[AuditResult]) -> None:
        """Hold captured audits as pending (written with the next report, before their
        snapshot is saved)."""
        with self._lock:
            for result in results:
                self._results[result_key(result)] = result

    def settle(self, why: str) -> None:
        """Record every audit still pending as not attacked (`why`); rewrite the report if any."""
        with self._lock:
            pending = [k for k, r in self._results.items() if is_pending(r.error)]
            for key in pending:
                result = self._results[key]
                snapshot = result.info.get("snapshot")
                error = settle_error(why, snapshot, self._config.keep_snapshots)
                self._results[key] = dataclasses.replace(result, error=error)
                self._unseen.append(self._results[key])
            if pending:
                self._write()

    def reload(self, steps: Iterable[int], lost: Callable[[int, str], AuditResult]) -> None:
        """Read back the audits of `steps` from an earlier run's report.

        An audit the earlier run left pending is settled (its attack never came back); a step
        of `steps` with no audit in the report gets `lost(step, why)`.
        """
        steps = set(steps)
        if not steps:
            return
        keep = self._config.keep_snapshots
        ended = "the run that took it ended before its attack finished"
        for result in self._earlier_results():
            if is_pending(result.error):
                result.error = settle_error(ended, result.info.get("snapshot"), keep)
            if result.step in steps:  # later steps are taken again by this run
                with self._lock:
                    self._results[result_key(result)] = result
        with self._lock:
            missing = steps - {key[0] for key in self._results}
        report = Path(self._config.output_dir) / "report.json"
        for step in sorted(missing):
            self.add(
                lost(
                    step,
                    f"lost: an earlier run counted step {step} as audited but {report} holds "
                    "no result for it (that run was killed before writing it, or output_dir "
                    "changed): resume from an earlier checkpoint to audit it again",
                )
            )
        self.write()

    def _earlier_results(self) -> list[AuditResult]:
        """The audits of the report already in output_dir (none when there is none)."""
        if not (Path(self._config.output_dir) / "report.json").is_file():
            return []
        try:
            audits = read_report(self._config.output_dir)["audits"]
            return [AuditResult(**{k: v for k, v in a.items() if k in _FIELDS}) for a in audits]
        except (GradAuditError, OSError, TypeError, KeyError) as error:
            self._warn(f"the earlier report in {self._config.output_dir} is unreadable: {error}")
            return []

    def all(self) -> list[AuditResult]:
        """Every audit (pending ones included), by step."""
        with self._lock:
            return [self._results[k] for k in sorted(self._results, key=_sort_key)]

    def take_unseen(self) -> list[AuditResult]:
        """Audits finished since the last call."""
        with self._lock:
            unseen, self._unseen = self._unseen, []
        return unseen

    def write(self) -> Path | None:
        """Write the report of every audit so far; its path, or None when that failed."""
        with self._lock:
            return self._write()

    def _write(self) -> Path | None:
        directory = self._config.output_dir
        try:
            audits = [self._results[k] for k in sorted(self._results, key=_sort_key)]
            privacy = self._privacy()
            report = build_report(
                audits,
                config=self._config.report_dict(),
                redact=self._config.redact,
                epsilon=None if privacy is None else privacy["epsilon"],
                privacy=privacy,
            )
            path = write_report(directory, report)
        except OSError as error:
            self._warn(f"could not write the report: {describe_os_error(error, directory)}")
            return None
        except Exception as error:  # noqa: BLE001 - a report failure never reaches training
            what = f"{type(error).__name__}: {error}"
            self._warn(f"could not write the report to {directory}: {what}")
            return None
        self.write_error = None
        return path

    def _warn(self, message: str) -> None:
        """Record `message` and warn once per distinct message; training goes on."""
        self.write_error = message
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(
                f"gradaudit: {message} (training goes on; the report is written again after "
                "the next audit and at close())",
                RuntimeWarning,
                stacklevel=2,
            )


def _sort_key(key: ResultKey) -> tuple[int, tuple[str, ...], str]:
    return (-1 if key[0] is None else key[0], key[1], key[2])
