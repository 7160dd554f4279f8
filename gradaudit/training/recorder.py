"""Which steps are audited, and the training batch of each: a forward pre-hook records them.

The recorder counts optimizer steps and audits (what a checkpoint saves), memoizes whether
the coming step is sampled, copies the inputs of every training forward of a sampled step to
the CPU, notes the float type each audited module computes in (bfloat16 under autocast),
and holds the auditor's hook handles until `close()`. Its hooks never raise into training: a
batch that cannot be audited (e.g. no labels) is warned about once and recorded as the
step's `problem`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradaudit.model.batch import BATCH_KEYS, Batch, check_batch, concat_batches
from gradaudit.training.config import AuditConfig

# Every rank's batch of a step, in rank order (None where a rank recorded none).
Gather = Callable[[Batch | None], list[Batch | None]]


class BatchRecorder:
    """Records the batches of sampled steps from `model`'s forward pre-hook; counts steps."""

    def __init__(self, model: nn.Module, config: AuditConfig, modules: list[str]) -> None:
        self._config = config
        self._model = model
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self.step = 0  # optimizer steps taken
        self.audited_steps: list[int] = []
        self.problem: str | None = None  # why this step's batch cannot be audited
        self.precision: dict[str, torch.dtype] = {}  # module -> the float type it computes in
        self._batches: list[Batch] = []
        self._checked = False  # the first training batch was checked for ids and labels
        self._next: tuple[int, bool] = (0, False)  # (step, is it sampled)
        self._closed = False
        self._hooks = [model.register_forward_pre_hook(self._record, with_kwargs=True)]
        for name in modules:
            hook = model.get_submodule(name).register_forward_hook(self._precision_hook(name))
            self._hooks.append(hook)

    @property
    def audits(self) -> int:
        """Audits taken so far (steps captured, on every rank)."""
        return len(self.audited_steps)

    def hold(self, hook: RemovableHandle | None) -> None:
        """Keep `hook` to remove it at `close()`."""
        if hook is not None:
            self._hooks.append(hook)

    def sampled(self, step: int) -> bool:
        """Whether optimizer step `step` is audited (decided once per step)."""
        if self._next[0] != step:
            self._next = (step, self._config.is_sampled(step, self.audits))
        return self._next[1]

    def _precision_hook(self, name: str) -> Callable[..., None]:
        def note(module: nn.Module, args: tuple, output: object) -> None:
            if torch.is_grad_enabled() and torch.is_tensor(output) and output.is_floating_point():
                self.precision[name] = output.dtype

        return note

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._closed or not torch.is_grad_enabled():
            return  # evaluation forwards are not training batches
        if self._checked and not self.sampled(self.step + 1):
            return
        try:
            inputs = {**dict(zip(self._forward_params, args)), **kwargs}
            tensors = {k: inputs[k] for k in BATCH_KEYS if torch.is_tensor(inputs.get(k))}
            tensors = check_batch(tensors, self._model)  # a causal LM's labels are its ids
            if self.sampled(self.step + 1):
                self._batches.append(
                    {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
                )
        except Exception as error:  # noqa: BLE001 - never raised into the training forward
            self._refuse(str(error) or type(error).__name__)
        self._checked = True

    def _refuse(self, why: str) -> None:
        """This step's batch cannot be audited: say so once, record it for the step."""
        self.problem = (
            f"the training forward cannot be audited: {why}; pass input_ids and labels to the "
            "model's forward (a custom compute_loss that pops the labels must still pass "
            "them, e.g. model(**inputs, labels=labels))"
        )
        if not self._checked:
            message = f"gradaudit: {self.problem}; training goes on"
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def step_batch(self, pad_token_id: int, gather: Gather | None) -> tuple[Batch | None, dict]:
        """The recorded batch of this step (every rank's with `gather`), and how it was made.

        With `gather`, every rank must call this for the step, so no rank waits forever.
        """
        batch = None
        if self._batches and self.problem is None:
            try:
                batch = concat_batches(self._batches, pad_token_id)
            except Exception as error:  # noqa: BLE001 - every rank must still gather
                self.problem = f"the micro-batches do not concatenate: {error}"
        ranks = 1
        if gather is not None:
            gathered = [b for b in gather(batch) if b is not None]
            batch = concat_batches(gathered, pad_token_id) if gathered else None
            ranks = len(gathered)
        return batch, {"micro_batches": len(self._batches), "ranks": ranks}

    def count_audit(self, step: int) -> None:
        """Count `step` as audited (on every rank, so all ranks keep sampling the same steps)."""
        self.audited_steps.append(step)

    def advance(self, step: int) -> None:
        """Step `step` was taken: its batches are dropped."""
        self.step = step
        self._batches = []
        self.problem = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "audits": self.audits, "audited_steps": self.audited_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state["step"]`; audits counted past it (not checkpointed) are dropped."""
        self.step = int(state["step"])
        self.audited_steps = [s for s in state["audited_steps"] if s <= self.step]

    def close(self) -> None:
        """Stop recording and remove every hook held."""
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._batches = []
