"""`GradAuditCallback`: audit sampled steps of a `transformers.Trainer` run.

    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(GradAuditCallback(AuditConfig(modules=["query@0"]), trainer=trainer))

With `trainer`, finished audits are logged as `gradaudit/rouge1` etc. through `trainer.log`,
so every `report_to` integration receives them; without it they go to `report.json` only.

A Trainer made private with Opacus (dp-transformers style: a GradSampleModule, a DPOptimizer,
Poisson batches) gets "noised" audits and ε when the callback is given the engine:
`GradAuditCallback(config, trainer=trainer, privacy_engine=engine)`. See
`examples/trainer_dp.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradaudit.integrations.common import (
    gather_batches,
    launched_with,
    log_results,
    refuse_sharded,
)
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, TrainerControl, TrainerState

from gradaudit.training.auditor import Auditor
from gradaudit.training.config import AuditConfig
from gradaudit.training.sources import dp_optimizer_of


def _refuse_sharded(args: TrainingArguments) -> None:
    refuse_sharded(
        "GradAuditCallback",
        args.distributed_state.distributed_type if args.distributed_state else None,
        deepspeed=bool(args.deepspeed) or launched_with("DEEPSPEED"),
        fsdp=bool(args.fsdp) or launched_with("FSDP"),
    )


class GradAuditCallback(TrainerCallback, ExportableState):
    """Builds an `Auditor` at train begin, audits at `on_pre_optimizer_step`, closes at end.

    Only world rank 0 saves, attacks and writes; under DDP the reference batch of a step is
    gathered from every rank, as its gradient is the all-reduced one. Its counters are saved
    in checkpoints, so a resumed run keeps counting steps and audits.

    When the Trainer's optimizer is (or wraps) an Opacus DPOptimizer, pass `privacy_engine`
    (the `PrivacyEngine`, or the accountant, counting its steps); `dataset_size` (for
    δ = 1/N) defaults to the length of the training data set.
    """

    def __init__(
        self,
        config: AuditConfig | Mapping[str, Any] | str | Path,
        trainer: Any = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        privacy_engine: Any = None,
        dataset_size: int | None = None,
    ) -> None:
        self.config = AuditConfig.load(config)
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.privacy_engine = privacy_engine
        self.dataset_size = dataset_size
        self.auditor: Auditor | None = None
        self.auditor_state: dict[str, Any] | None = None
        self._logging = False

    def state(self) -> dict[str, Any]:
        if self.auditor is not None:
            self.auditor_state = self.auditor.state_dict()
        return {
            "args": {"config": self.config.to_dict()},
            "attributes": {"auditor_state": self.auditor_state},
        }

    def _saved_state(self, state: TrainerState) -> dict[str, Any] | None:
        """This callback's counters from the checkpoint being resumed, if any."""
        if self.auditor_state is not None:  # set by restore_callback_states_from_checkpoint
            return self.auditor_state
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0]
        return (saved or {}).get("attributes", {}).get("auditor_state")

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        processing_class=None,
        optimizer=None,
        train_dataloader=None,
        **kwargs,
    ) -> None:
        _refuse_sharded(args)
        if self.auditor is not None:  # an earlier train() that raised left it open
            self.auditor.close()
        tokenizer = self.tokenizer or getattr(processing_class, "tokenizer", processing_class)
        saved = self._saved_state(state) if state.global_step > 0 else None
        # The Trainer hands callbacks accelerate's AcceleratedOptimizer; a DPOptimizer inside it
        # releases its gradient only within step(), so the auditor hooks that one itself.
        dataset = getattr(train_dataloader, "dataset", None)
        dataset_size = self.dataset_size or (len(dataset) if hasattr(dataset, "__len__") else None)
        self.auditor = Auditor(
            model,
            self.config,
            tokenizer=tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else None,
            optimizer=dp_optimizer_of(optimizer),
            max_grad_norm=args.max_grad_norm,
            is_main_process=state.is_world_process_zero,
            gather=gather_batches if args.world_size > 1 else None,
            last_step=state.max_steps or None,
            privacy_engine=self.privacy_engine,
            dataset_size=dataset_size,
        )
        self.auditor.load_state_dict(
            {"step": state.global_step, "audited_steps": (saved or {}).get("audited_steps", [])}
        )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        # The Trainer has all-reduced, unscaled and clipped the gradients by now. A DPOptimizer
        # has not yet clipped per example nor added noise: the auditor's hook takes that step.
        if self.auditor.dp_optimizer is None:
            self.auditor.before_step(state.global_step + 1)

    def _log_new_results(self) -> None:
        if self.auditor is None or self._logging:
            return
        results = self.auditor.new_results()
        if self.trainer is None or not results:
            return
        self._logging = True  # trainer.log calls on_log of every callback, this one included
        try:
            log_results(results, self.trainer.log)
        finally:
            self._logging = False

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self._log_new_results()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        # Not called when training raises: the auditor's exit handler then stops the worker,
        # settles pending audits and writes the report.
        if self.auditor is None:
            return
        self.auditor_state = self.auditor.state_dict()
        self.auditor.close()
        self._log_new_results()
