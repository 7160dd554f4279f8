"""What an `Auditor` audits during training: modules, sampled steps, attack, output."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradaudit.errors import GradAuditError

DEFAULT_EVERY_N_STEPS = 100  # sampling when no rule is given and the run's length is unknown
DEFAULT_MAX_AUDITS = 8
DEFAULT_OUTPUT_DIR = "gradaudit-out"
# How an audit runs, not what it audits: left out of the configuration a report embeds.
RUNTIME_FIELDS = (
    "background", "attack_timeout_s", "close_timeout_s", "start_timeout_s", "worker_threads",
)  # fmt: skip


@dataclass
class AuditConfig:
    """Settings of in-training audits; loadable from a dict, YAML or JSON file.

    The defaults are meant for a user who sets nothing: `attack="auto"` (span where the
    gradient's spectrum allows it, gradmatch elsewhere), the layer-0 query (where a batch
    leaks most: exact span mode on encoders), `max_audits=8` audits spread evenly over the
    run, one worker thread, each attack stopped after `attack_timeout_s=900`, and `close()`
    waiting at most `close_timeout_s=1800` for the attacks still running when training ends.

    A step (1-based optimizer step number) is audited when it is at least `first_step`,
    fewer than `max_audits` audits were taken, and it is in `steps`, or falls on
    `first_step + k * every_n_steps`, or wins a draw of `probability` (a generator seeded
    by `seed` and the step, so every rank and every resumed run draws the same). With none
    of the three rules given, the `max_audits` audits are spread evenly over the run when
    its length is known (`for_run`), else taken every `DEFAULT_EVERY_N_STEPS` steps.
    `output_dir` None: `<TrainingArguments.output_dir>/gradaudit` under the Trainer
    callback, `DEFAULT_OUTPUT_DIR` elsewhere.
    The background worker must be ready (its model built) within `start_timeout_s`, each of
    its attacks may take `attack_timeout_s` (a timeout is recorded as that audit's error);
    `close()` waits for pending ones at most `close_timeout_s` in all (None: until each
    finished or timed out, so still bounded; those left are recorded as not attacked); the
    worker uses `worker_threads` CPU threads, leaving the others to training.
    `attack=None` captures and saves snapshots without attacking them (attack them later
    with `gradaudit attack OUTPUT_DIR/snapshots`).
    `separate_modules` attacks each selected module's gradient on its own (an adversary who
    sees one module, the partial-gradient threat); False attacks them jointly.
    `dp_delta` is the δ of ε under DP-SGD (default 1/N when the data set size N is known).
    `dp_contrast` also audits, at each audited step of an Opacus DP-SGD run, the raw gradient
    behind the release (the mean per-example gradient, never released), attacked like the
    released one, to show what DP hides; it needs a DPOptimizer (the `Auditor` refuses it
    otherwise).
    """

    modules: list[str] = field(default_factory=lambda: ["query@0"])
    every_n_steps: int | None = None
    probability: float | None = None
    steps: list[int] | None = None
    first_step: int = 1
    max_audits: int | None = DEFAULT_MAX_AUDITS
    attack: str | None = "auto"
    attack_options: dict[str, Any] = field(default_factory=dict)
    budget: float = 1.0
    seed: int = 0
    device: str = "auto"
    output_dir: str | None = None
    background: bool = True
    attack_timeout_s: float = 900.0
    close_timeout_s: float | None = 1800.0
    start_timeout_s: float = 600.0
    worker_threads: int = 1
    keep_snapshots: bool = False
    redact: bool = False
    separate_modules: bool = True
    dp_delta: float | None = None
    dp_contrast: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.modules, str):
            self.modules = [self.modules]
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = str(self.output_dir)
        _check_types(self)
        self.modules = list(self.modules)
        if not self.modules:
            raise GradAuditError("modules is empty: give at least one module spec, e.g. query@0")
        if self.steps is not None:
            self.steps = sorted({int(s) for s in self.steps})
        _check_ranges(self)
        _check_device(self.device)
        if self.attack is not None:
            _check_attack(self.attack, self.attack_options)

    def is_sampled(self, step: int, audits_taken: int = 0) -> bool:
        """Whether optimizer step `step` (1-based) is audited after `audits_taken` audits."""
        if step < self.first_step:
            return False
        if self.max_audits is not None and audits_taken >= self.max_audits:
            return False
        if self.steps is not None and step in self.steps:
            return True
        every = self._interval()
        if every is not None and (step - self.first_step) % every == 0:
            return True
        # A generator of its own per step: no global RNG, same draw on every rank and resume.
        if not self.probability:
            return False
        return random.Random(f"{self.seed}:{step}").random() < self.probability

    def selects_nothing(self, last_step: int | None = None) -> str | None:
        """Why no step up to `last_step` (or ever) can be audited, or None when some can."""
        if self.max_audits == 0:
            return "max_audits is 0"
        if self.steps is not None and self._interval() is None and not self.probability:
            steps = [s for s in self.steps if s >= self.first_step]
            if last_step is not None:
                steps = [s for s in steps if s <= last_step]
            if not steps:
                return f"no step in {self.steps} lies in [{self.first_step}, {last_step or 'end'}]"
            return None
        if self._interval() is None and not self.probability:
            return "probability is 0 and neither steps nor every_n_steps is set"
        if last_step is not None and last_step < self.first_step:
            return f"training ends at step {last_step}, before first_step {self.first_step}"
        return None

    @property
    def default_sampling(self) -> bool:
        """Whether no sampling rule (steps, every_n_steps, probability) was given."""
        return self.every_n_steps is None and self.probability is None and self.steps is None

    def _interval(self) -> int | None:
        return DEFAULT_EVERY_N_STEPS if self.default_sampling else self.every_n_steps

    def for_run(
        self, last_step: int | None = None, output_dir: str | Path = DEFAULT_OUTPUT_DIR
    ) -> AuditConfig:
        """This config as a run of `last_step` steps uses it (a copy, or itself unchanged).

        `output_dir` fills an unset one. Without a sampling rule, the `max_audits` audits are
        spread evenly from `first_step` to `last_step` (every `DEFAULT_EVERY_N_STEPS` steps
        when the run's length or the cap is unknown).
        """
        changes: dict[str, Any] = {}
        if self.output_dir is None:
            changes["output_dir"] = str(output_dir)
        if self.default_sampling:
            every = DEFAULT_EVERY_N_STEPS
            if last_step and self.max_audits and last_step >= self.first_step:
                every = max(1, (last_step - self.first_step + 1) // self.max_audits)
            changes["every_n_steps"] = every
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """Every field (what `from_dict` reads back)."""
        return dataclasses.asdict(self)

    def report_dict(self) -> dict[str, Any]:
        """What is audited, for a report: every field but the runtime knobs (RUNTIME_FIELDS)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditConfig:
        """Build from a mapping, refusing unknown keys."""
        _check_keys(data)
        return cls(**dict(data))

    @classmethod
    def load(cls, source: AuditConfig | Mapping[str, Any] | str | Path) -> AuditConfig:
        """A config from itself, a mapping, or a YAML/JSON file path."""
        if isinstance(source, AuditConfig):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        return cls.from_file(source)

    @classmethod
    def from_file(cls, path: str | Path) -> AuditConfig:
        """Read a `.yaml`/`.yml` or `.json` file holding one mapping."""
        return cls.from_dict(read_settings(path))


def _check_keys(data: Mapping[str, Any], where: str = "") -> None:
    known = {f.name for f in dataclasses.fields(AuditConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GradAuditError(
            f"unknown AuditConfig key(s) {', '.join(unknown)}{where}; "
            f"known: {', '.join(sorted(known))}"
        )


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings a `.yaml`/`.yml` or `.json` file holds (one mapping, keys checked), only
    those: what they leave out is for other sources or the defaults."""
    path = Path(path)
    if not path.is_file():
        raise GradAuditError(f"audit config {path} does not exist: pass a YAML or JSON file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise GradAuditError(f"audit config {path} is neither .yaml/.yml nor .json: rename it")
    if not isinstance(data, Mapping):
        raise GradAuditError(f"audit config {path} does not hold a mapping of settings")
    _check_keys(data, f" in {path}")
    return dict(data)


# Field kinds, checked before any value is used: a wrong type is one clear error, not a
# TypeError later (or, like "5" or 2.5 steps, silently wrong sampling).
_WHOLE = ("every_n_steps", "first_step", "max_audits", "seed", "worker_threads")
_REAL = ("probability", "budget", "attack_timeout_s", "close_timeout_s", "start_timeout_s",
         "dp_delta")  # fmt: skip
_FLAGS = ("background", "keep_snapshots", "redact", "separate_modules", "dp_contrast")
_NULLABLE = ("every_n_steps", "max_audits", "probability", "close_timeout_s", "dp_delta")


def _kind_error(value: Any, kind: str) -> str | None:
    """Why `value` is not of `kind` ("whole", "real", "flag", "text"), or None when it is."""
    if kind == "flag":
        return None if isinstance(value, bool) else "true or false"
    if kind == "text":
        return None if isinstance(value, str) else "a string"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "a whole number" if kind == "whole" else "a number"
    if kind == "whole" and not isinstance(value, numbers.Integral):
        return "a whole number"
    if not math.isfinite(value):
        return "a finite number"
    return None


def _check_kind(name: str, value: Any, kind: str) -> None:
    why = _kind_error(value, kind)
    if why is not None:
        quoted = " (without quotes)" if isinstance(value, str) else ""
        raise GradAuditError(f"{name} must be {why}{quoted}, got {value!r}")


def _check_types(config: AuditConfig) -> None:
    for names, kind in ((_WHOLE, "whole"), (_REAL, "real"), (_FLAGS, "flag")):
        for name in names:
            value = getattr(config, name)
            if not (value is None and name in _NULLABLE):
                _check_kind(name, value, kind)
    if not isinstance(config.modules, (list, tuple)):
        raise GradAuditError(f"modules must be a list of module specs, got {config.modules!r}")
    for module in config.modules:
        _check_kind("each of modules", module, "text")
    for step in config.steps or []:
        _check_kind("each of steps", step, "whole")
    _check_kind("device", config.device, "text")
    if config.output_dir is not None:
        _check_kind("output_dir", config.output_dir, "text")
    if config.attack is not None:
        _check_kind("attack", config.attack, "text")
    if not isinstance(config.attack_options, Mapping):
        raise GradAuditError(
            f"attack_options must be a mapping of option names to values, got "
            f"{config.attack_options!r}"
        )


def _check_ranges(config: AuditConfig) -> None:
    def positive(name: str, value: Any, least: float = 0, strict: bool = True) -> None:
        if value is not None and (value <= least if strict else value < least):
            raise GradAuditError(f"{name} must be {'>' if strict else '>='} {least}, got {value}")

    positive("every_n_steps", config.every_n_steps, 1, strict=False)
    positive("first_step (steps count from 1)", config.first_step, 1, strict=False)
    positive("max_audits", config.max_audits, 0, strict=False)
    positive("worker_threads", config.worker_threads, 1, strict=False)
    for name in ("budget", "attack_timeout_s", "close_timeout_s", "start_timeout_s"):
        positive(name, getattr(config, name))
    if config.probability is not None and not 0 <= config.probability <= 1:
        raise GradAuditError(f"probability must be in [0, 1], got {config.probability}")
    if config.dp_delta is not None and not 0 < config.dp_delta < 1:
        raise GradAuditError(f"dp_delta must lie in (0, 1), got {config.dp_delta}")


def _check_device(device: str) -> None:
    """Refuse a device this machine does not have (every attack would fail on it)."""
    if device == "auto":
        return
    try:
        found = torch.device(device)
    except RuntimeError:
        raise GradAuditError(
            f"device {device!r} is not a torch device: use auto, cpu, cuda or cuda:1"
        ) from None
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise GradAuditError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            "so every attack would fail: use auto, cpu or an existing cuda:N"
        )
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise GradAuditError(f"device {device!r}: MPS is not available here: use auto or cpu")


def _check_attack(attack: str, options: Mapping[str, Any]) -> None:
    """Unknown attack, unknown option or an option of the wrong kind: fail now, not per audit."""
    from gradaudit.attacks import get_attack

    fields = {f.name: f for f in dataclasses.fields(get_attack(attack).Options)}
    for name, value in options.items():
        default = getattr(fields.get(name), "default", dataclasses.MISSING)
        kind = {bool: "flag", int: "whole", float: "real", str: "text"}.get(type(default))
        if kind is not None:
            _check_kind(f"attack option {name} of attack {attack!r}", value, kind)
    try:
        get_attack(attack, **options)
    except GradAuditError:
        raise
    except (TypeError, ValueError) as error:
        raise GradAuditError(f"attack {attack!r} refuses its options: {error}") from None
