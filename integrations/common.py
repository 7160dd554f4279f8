"""What the Trainer and Accelerate adapters share: refusing sharded backends, gathering every
rank's batch, and logging finished audits as `gradaudit/...` metrics."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from accelerate.utils import DistributedType, gather_object

from gradaudit.errors import GradAuditError
from gradaudit.scoring.result import AuditResult
from gradaudit.training.results import deliver, result_metrics


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
