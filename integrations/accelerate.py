"""`AccelerateAuditor`: audit sampled steps of a training loop run with Accelerate.

model, optimizer, data = accelerator.prepare(model, optimizer, data)
auditor = AccelerateAuditor(accelerator, model, optimizer, config, tokenizer=tokenizer)
accelerator.register_for_checkpointing(auditor)  # optional: resume keeps counting
...  # the usual loop; gradients are taken in the optimizer's step pre-hook
auditor.close()

Made private with Opacus before `prepare`, pass `privacy_engine=engine, dataset_size=N`, and
step with `gradaudit.privacy.dp_step(model, optimizer, batch, backward=accelerator.backward)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError
from gradaudit.training.auditor import Auditor, result_metrics
from gradaudit.training.config import AuditConfig


def gather_batches(batch: Any) -> list[Any]:
    """Every rank's batch, in rank order (`None` where a rank recorded none)."""
    return gather_object([batch])


class AccelerateAuditor(Auditor):
    """An `Auditor` wired to an `Accelerator`: main process attacks, every rank's batch.

    Hooks the torch optimizer inside the prepared `AcceleratedOptimizer`, so it sees each real
    step once (after gradient accumulation, all-reduce, unscaling and any clipping). Finished
    audits are logged through `accelerator.log` when trackers are set. With an Opacus
    DPOptimizer inside, the released gradient is audited: pass `privacy_engine` and
    `dataset_size` (or `config.dp_delta`) for ε.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: Any,
        config: AuditConfig | Mapping[str, Any] | str | Path,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_grad_norm: float | None = None,
        last_step: int | None = None,
        privacy_engine: Any = None,
        dataset_size: int | None = None,
    ) -> None:
        if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise GradAuditError(
                f"AccelerateAuditor does not support {accelerator.distributed_type.value}: it "
                "shards gradients, so no rank holds a module's full gradient; train with DDP "
                "or on one process"
            )
        self.accelerator = accelerator
        super().__init__(
            accelerator.unwrap_model(model),
            AuditConfig.load(config),
            tokenizer=tokenizer,
            optimizer=getattr(optimizer, "optimizer", optimizer),
            max_grad_norm=max_grad_norm,
            is_main_process=accelerator.is_main_process,
            gather=gather_batches if accelerator.num_processes > 1 else None,
            last_step=last_step,
            privacy_engine=privacy_engine,
            dataset_size=dataset_size,
        )

    def _log_new_results(self) -> None:
        results = self.new_results()
        if self.accelerator.trackers:
            for result in results:
                self.accelerator.log(result_metrics(result), step=self.step)

    def before_step(self, step: int | None = None) -> None:
        super().before_step(step)
        self._log_new_results()

    def close(self) -> Path | None:
        path = super().close()
        self._log_new_results()
        return path
