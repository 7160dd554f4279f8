"""What the Trainer and Accelerate adapters share: refusing sharded backends, gathering every
rank's batch, logging finished audits as `gradaudit/...` metrics, and reading the settings
from the environment (`GRADAUDIT_*`)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType, gather_object

from gradaudit.errors import GradAuditError
from gradaudit.scoring.result import AuditResult
from gradaudit.training.config import AuditConfig, read_settings
from gradaudit.training.results import deliver, result_metrics

# Environment variables, read when the callback is made (as WANDB_PROJECT is by W&B's).
ENV_CONFIG = "GRADAUDIT_CONFIG"  # a YAML or JSON file of AuditConfig settings
ENV_MODULES = "GRADAUDIT_MODULES"  # module specs, comma-separated: query@0,ffn_in@2
ENV_OUTPUT_DIR = "GRADAUDIT_OUTPUT_DIR"
ENV_DISABLE = "GRADAUDIT_DISABLE"  # 1/true/yes/on: the callback does nothing
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
# A piece of a comma list that continues the layer list of the spec before it: query@0,4
_LAYER_PART = re.compile(r"\s*(\d+(-\d+)?|last|all)\s*")


def gather_batches(batch: Any) -> list[Any]:
    """Every rank's batch, in rank order (`None` where a rank recorded none)."""
    return gather_object([batch])


def launched_with(backend: str) -> bool:
    """Whether `accelerate launch` asked for `backend` ("DEEPSPEED", "FSDP") in the environment."""
    return os.environ.get(f"ACCELERATE_USE_{backend}", "").lower() == "true"


def refuse_sharded(
    adapter: str, distributed_type: Any, *, deepspeed: bool = False, fsdp: bool = False
) -> None:
    """Refuse DeepSpeed and FSDP (as `distributed_type`, or as flagged): no rank holds a
    module's full gradient."""
    if deepspeed or distributed_type == DistributedType.DEEPSPEED:
        backend = "DeepSpeed"
    elif fsdp or distributed_type == DistributedType.FSDP:
        backend = "FSDP"
    else:
        return
    raise GradAuditError(
        f"{adapter} does not support {backend}: it shards parameters and gradients, so no "
        "rank holds a module's full gradient; audit a run trained with DDP or on one "
        "process, or save snapshots with gradaudit.capture"
    )


def log_results(results: Iterable[AuditResult], log: Callable[[dict[str, float]], Any]) -> None:
    """Pass each finished audit's `gradaudit/...` metrics (`result_metrics`) to `log`.

    A logger that fails is warned about, never raised into training (report.json has them).
    """
    deliver(results, lambda result: log(result_metrics(result)))


def disabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `GRADAUDIT_DISABLE` turns auditing off (1, true, yes, on; any case)."""
    value = environ.get(ENV_DISABLE, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise GradAuditError(
        f"{ENV_DISABLE}={environ[ENV_DISABLE]!r} is neither true (1, true, yes, on) nor false "
        "(0, false, no, off, empty): set one of those"
    )


def split_modules(text: str) -> list[str]:
    """Module specs from a comma list; a bare layer part continues the spec before it
    ("query@0,4,value@1" is query@0,4 and value@1)."""
    specs: list[str] = []
    for part in text.split(","):
        if specs and "@" in specs[-1] and _LAYER_PART.fullmatch(part):
            specs[-1] += "," + part.strip()
        elif part.strip():
            specs.append(part.strip())
    return specs


def _file_settings(path: str | Path, origin: str) -> dict[str, Any]:
    try:
        return read_settings(path)
    except GradAuditError as error:
        raise GradAuditError(f"{error} (from {origin})") from None


def _env_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if environ.get(ENV_MODULES, "").strip():
        settings["modules"] = split_modules(environ[ENV_MODULES])
    if environ.get(ENV_OUTPUT_DIR, "").strip():
        settings["output_dir"] = environ[ENV_OUTPUT_DIR].strip()
    return settings


def layered_config(
    explicit: AuditConfig | Mapping[str, Any] | str | Path | None,
    environ: Mapping[str, str] = os.environ,
) -> AuditConfig:
    """The settings of an adapter, each from the first that gives it: `explicit` (an
    AuditConfig gives every field but an unset output_dir; a mapping or a file, the keys it
    holds), then GRADAUDIT_MODULES and GRADAUDIT_OUTPUT_DIR, then the file GRADAUDIT_CONFIG
    names, then AuditConfig's defaults. Environment settings overridden are warned about."""
    env = _env_settings(environ)
    if isinstance(explicit, AuditConfig):
        given = explicit.to_dict()
    elif isinstance(explicit, Mapping):
        given = dict(explicit)
    elif explicit is not None:
        given = _file_settings(explicit, "the config given to the callback")
    else:
        given = {}
    if given.get("output_dir", "") is None:  # unset: for the layers below
        del given["output_dir"]
    layers: dict[str, Any] = {}
    if environ.get(ENV_CONFIG, "").strip():
        layers.update(_file_settings(environ[ENV_CONFIG].strip(), ENV_CONFIG))
    layers.update(env)
    overridden = sorted(
        name for name, key in ((ENV_MODULES, "modules"), (ENV_OUTPUT_DIR, "output_dir"))
        if key in env and key in given
    )  # fmt: skip
    if overridden:
        warnings.warn(
            f"gradaudit: {', '.join(overridden)} ignored: the config given in code sets it "
            "(explicit settings win over the environment)",
            RuntimeWarning,
            stacklevel=3,
        )
    return AuditConfig.from_dict({**layers, **given})
