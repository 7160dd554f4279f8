"""LoRA-wrapped copies of a model for experiments, trained a few real steps.

PEFT initialises every lora_B to zero, so at step 0 no gradient reaches lora_A. A few optimiser
steps on sentences the experiment does not audit move B, so the adapter gradients audited are
those of fine-tuning under way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError
from gradaudit.model.batch import labels_for, make_batch
from gradaudit.model.families import is_causal_lm, layout

LORA_STEPS = 5  # optimiser steps before an audit: B moves off zero after the first
LORA_LEARNING_RATE = 1e-3
LORA_TRAIN_BATCH = 8


def lora_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rank: int,
    components: Sequence[str],
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    steps: int = LORA_STEPS,
    seed: int = 0,
    dropout: float = 0.0,
) -> nn.Module:
    """A copy of `model` with LoRA adapters of rank `rank` on `components` (e.g. query,
    value) and `lora_dropout` `dropout` (PEFT's default 0), trained `steps` AdamW steps in
    training mode on `texts` (batches of `LORA_TRAIN_BATCH`, cycled), returned in eval mode.
    `model` is not changed."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise GradAuditError("LoRA experiments need peft: pip install 'gradaudit[peft]'") from None
    if rank < 1:
        raise GradAuditError(f"a LoRA rank must be at least 1, got {rank}")
    if not texts:
        raise GradAuditError("LoRA training needs sentences: give the data set some")
    family = layout(model).family
    unknown = [c for c in components if c not in family.components]
    if unknown:
        raise GradAuditError(
            f"LoRA targets {unknown} are not components of the {family.name} family: choose "
            f"from {', '.join(family.components)}"
        )
    task = TaskType.CAUSAL_LM if is_causal_lm(model) else TaskType.SEQ_CLS
    targets = [family.components[c] for c in components]
    config = LoraConfig(r=rank, target_modules=targets, lora_dropout=dropout, task_type=task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(copy.deepcopy(model), config)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(trainable, lr=LORA_LEARNING_RATE)
        wrapped.train()
        device = next(wrapped.parameters()).device
        for step in range(steps):
            start = step * LORA_TRAIN_BATCH % len(texts)
            chunk = slice(start, start + LORA_TRAIN_BATCH)
            batch = make_batch(
                wrapped, tokenizer, list(texts[chunk]), labels_for(wrapped, list(labels[chunk]))
            )
            loss = wrapped(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
    return wrapped.eval()
