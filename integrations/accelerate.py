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
from functools import partial
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from gradaudit.integrations.common import gather_batches, log_results, refuse_sharded
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.scoring.result import AuditResult
from gradaudit.training.auditor import Auditor
from gradaudit.training.config import AuditConfig


class AccelerateAuditor:
    """An `Auditor` wired to an `Accelerator`: main process attacks, every rank's batch.

    Hooks the torch optimizer inside the prepared `AcceleratedOptimizer`, so it sees each real
    step once (after gradient accumulation, all-reduce, unscaling and any clipping). Finished
    audits are logged through `accelerator.log` when trackers are set. With an Opacus
    DPOptimizer inside, the released gradient is audited: pass `privacy_engine` and
    `dataset_size` (or `config.dp_delta`) for ε. The `Auditor` itself is `.auditor`.
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
        refuse_sharded("AccelerateAuditor", accelerator.distributed_type)
        self.accelerator = accelerator
        self.auditor = Auditor(
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
            on_result=self._log,
        )

    def _log(self, result: AuditResult) -> None:
        if self.accelerator.trackers:  # trackers may be set up after the auditor
            log_results([result], partial(self.accelerator.log, step=self.auditor.step))

    # -- the Auditor's interface ------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self.auditor.model

    @property
    def config(self) -> AuditConfig:
        return self.auditor.config

    @property
    def step(self) -> int:
        """Optimizer steps taken so far."""
        return self.auditor.step

    @property
    def dp_optimizer(self) -> Any:
        """The Opacus DPOptimizer whose released gradients are audited, or None."""
        return self.auditor.dp_optimizer

    @property
    def results(self) -> list[AuditResult]:
        """Finished audits, by step."""
        return self.auditor.results

    def new_results(self) -> list[AuditResult]:
        """Audits finished since the last call and not yet logged (logging takes them)."""
        return self.auditor.new_results()

    def epsilon(self) -> float | None:
        return self.auditor.epsilon()

    def privacy(self) -> dict[str, Any] | None:
        return self.auditor.privacy()

    def before_step(self, step: int | None = None) -> None:
        """Take step `step`'s gradients if sampled (the optimizer's hook already does)."""
        self.auditor.before_step(step)

    def state_dict(self) -> dict[str, Any]:
        """Counters, for `accelerator.register_for_checkpointing`."""
        return self.auditor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.auditor.load_state_dict(state)

    def close(self) -> Path | None:
        """Wait for pending attacks, write the report (main process: its path), log."""
        return self.auditor.close()

    def __enter__(self) -> AccelerateAuditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
