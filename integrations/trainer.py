"""`GradAuditCallback`: audit sampled steps of a `transformers.Trainer` run.

    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[GradAuditCallback()])
    # or: trainer.add_callback(GradAuditCallback)

Settings, each from the first that gives it: the `config` argument (an `AuditConfig`, a
mapping or a YAML/JSON file), the environment (`GRADAUDIT_MODULES`: comma-separated module
specs; `GRADAUDIT_OUTPUT_DIR`), the file `GRADAUDIT_CONFIG` names, `AuditConfig`'s defaults.
`GRADAUDIT_DISABLE=1` makes the callback do nothing. The output goes to
`<TrainingArguments.output_dir>/gradaudit` unless set, in a folder per trial during a
hyper-parameter search (`hp_name`'s name for it, else one from its parameters).

Finished audits are logged as `gradaudit/rouge1` etc. to every `report_to` integration (and
`trainer.state.log_history`): the callback moves itself to the front of the Trainer's
callbacks at train begin, and hands each audit to the others' `on_log`, as `Trainer.log`
does, also at train end, before they close their writers.

A Trainer made private with Opacus (dp-transformers style: a GradSampleModule, a DPOptimizer,
Poisson batches) gets "noised" audits and ε when the callback is given the engine:
`GradAuditCallback(config, privacy_engine=engine)`. See `examples/trainer_dp.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradaudit.integrations.common import (
    disabled,
    gather_batches,
    launched_with,
    layered_config,
    log_results,
    refuse_sharded,
)
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.trainer_callback import (
    CallbackHandler,
    ExportableState,
    TrainerControl,
    TrainerState,
)

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


def trial_folder(state: TrainerState) -> str | None:
    """The folder of this hyper-parameter-search trial (None outside a search): its
    `hp_name`, else `trial-` and a digest of its parameters."""
    if not state.is_hyper_param_search:
        return None
    if state.trial_name:
        return re.sub(r"[^\w.=+-]+", "_", str(state.trial_name))
    params = json.dumps(state.trial_params or {}, sort_keys=True, default=str)
    return "trial-" + hashlib.sha256(params.encode()).hexdigest()[:10]


def _calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    """The Trainer's CallbackHandler that is running an event of `callback`, from the stack
    (callbacks are handed neither the Trainer nor its handler); None when called otherwise."""
    frame = sys._getframe(1)
    for _ in range(8):  # the event, call_event, the handler's event method, ...
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler) and any(c is callback for c in owner.callbacks):
            return owner
        frame = frame.f_back
    return None


class GradAuditCallback(TrainerCallback, ExportableState):
    """Builds an `Auditor` at train begin, audits at `on_pre_optimizer_step`, closes at end.

    Needs no argument: `config` (an AuditConfig, a mapping or a YAML/JSON file) overrides the
    environment's settings (`GRADAUDIT_*`, see the module), which override the defaults.
    Only world rank 0 saves, attacks and writes; under DDP the reference batch of a step is
    gathered from every rank, as its gradient is the all-reduced one. Its counters are saved
    in checkpoints, so a resumed run keeps counting steps and audits. `trainer` is no longer
    needed (the callback finds the Trainer's other callbacks itself).

    When the Trainer's optimizer is (or wraps) an Opacus DPOptimizer, pass `privacy_engine`
    (the `PrivacyEngine`, or the accountant, counting its steps); `dataset_size` (for
    δ = 1/N) defaults to the length of the training data set.
    """

    def __init__(
        self,
        config: AuditConfig | Mapping[str, Any] | str | Path | None = None,
        trainer: Any = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        privacy_engine: Any = None,
        dataset_size: int | None = None,
    ) -> None:
        self.disabled = disabled()  # GRADAUDIT_DISABLE: no config read, nothing done
        self.config = None if self.disabled else layered_config(config)
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.privacy_engine = privacy_engine
        self.dataset_size = dataset_size
        self.auditor: Auditor | None = None
        self.auditor_state: dict[str, Any] | None = None
        self._handler: CallbackHandler | None = None

    def state(self) -> dict[str, Any]:
        if self.auditor is not None:
            self.auditor_state = self.auditor.state_dict()
        return {
            "args": {"config": None if self.config is None else self.config.to_dict()},
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

    def run_config(self, args: TrainingArguments, state: TrainerState) -> AuditConfig:
        """The config of this run: output under `<args.output_dir>/gradaudit` unless set, in
        the trial's folder during a hyper-parameter search."""
        trainer_dir = Path(args.output_dir or "trainer_output")
        output = self.config.output_dir or str(trainer_dir / "gradaudit")
        trial = trial_folder(state)
        if trial is not None:
            output = str(Path(output) / trial)
        return dataclasses.replace(self.config, output_dir=output)

    def _take_handler(self) -> None:
        """Find the Trainer's callback handler and run first in it, so audits finished at
        train end reach the other callbacks before they close (moving an entry from where
        the handler's loop stands to the front skips and repeats no callback)."""
        handler = getattr(self.trainer, "callback_handler", None)
        if handler is None or not any(c is self for c in handler.callbacks):
            handler = _calling_handler(self)
        self._handler = handler
        if handler is None:
            warnings.warn(
                "gradaudit: GradAuditCallback was not called by a Trainer's callback handler: "
                "audits go to report.json only, not to report_to integrations",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        callbacks = handler.callbacks
        index = next(i for i, c in enumerate(callbacks) if c is self)
        callbacks.insert(0, callbacks.pop(index))

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
        if self.disabled:
            return
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
            self.run_config(args, state),
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
        self._take_handler()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        # The Trainer has all-reduced, unscaled and clipped the gradients by now. A DPOptimizer
        # has not yet clipped per example nor added noise: the auditor's hook takes that step.
        if self.auditor is not None and self.auditor.dp_optimizer is None:
            self.auditor.before_step(state.global_step + 1)

    def _log_new_results(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl
    ) -> None:
        """Log audits finished since the last call, as `Trainer.log` would (the Trainer's
        history and every other callback's `on_log`) but leaving its own logging as planned."""
        if self.auditor is None:
            return

        def log(metrics: dict[str, float]) -> None:
            state.log_history.append({**metrics, "step": state.global_step})
            if self._handler is not None:
                self._handler.call_event("on_log", args, state, control, logs=dict(metrics))

        log_results(self.auditor.new_results(), log)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self._log_new_results(args, state, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        # Not called when training raises: the auditor's exit handler then stops the worker,
        # settles pending audits and writes the report.
        if self.auditor is None:
            return
        self.auditor_state = self.auditor.state_dict()
        self.auditor.close()
        self._log_new_results(args, state, control)
