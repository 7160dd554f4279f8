"""Finished audits of a training run, the report they make, and their metrics for loggers."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gradaudit.errors import GradAuditError
from gradaudit.io import private_dir
from gradaudit.report import build_report, read_report, write_report
from gradaudit.scoring.metrics import SCORE_KEYS
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig

# (step, modules, gradient): a DP step's contrast audit shares step and modules with the
# released one.
ResultKey = tuple[int | None, tuple[str, ...], str]


def result_key(result: AuditResult) -> ResultKey:
    return (result.step, tuple(result.modules), result.gradient)


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

    def add(self, result: AuditResult) -> None:
        """Store a finished audit (from any thread) and rewrite the report."""
        with self._lock:
            self._results[result_key(result)] = result
            self._unseen.append(result)
            self._write()

    def reload(self, steps: Iterable[int]) -> None:
        """Read back the audits of `steps` from an earlier run's report, if there is one."""
        steps = set(steps)
        if not steps or not (Path(self._config.output_dir) / "report.json").is_file():
            return
        for audit in read_report(self._config.output_dir)["audits"]:
            if audit["step"] in steps:
                result = AuditResult.from_dict(audit)
                with self._lock:
                    self._results[result_key(result)] = result

    def all(self) -> list[AuditResult]:
        """Every finished audit, by step."""
        with self._lock:
            return [self._results[k] for k in sorted(self._results)]

    def take_unseen(self) -> list[AuditResult]:
        """Audits finished since the last call."""
        with self._lock:
            unseen, self._unseen = self._unseen, []
        return unseen

    def write(self) -> Path:
        """Write the report of every audit so far; its path."""
        with self._lock:
            return self._write()

    def _write(self) -> Path:
        audits = [self._results[k] for k in sorted(self._results)]
        privacy = self._privacy()
        report = build_report(
            audits,
            config=self._config.report_dict(),
            redact=self._config.redact,
            epsilon=None if privacy is None else privacy["epsilon"],
            privacy=privacy,
        )
        return write_report(self._config.output_dir, report)
