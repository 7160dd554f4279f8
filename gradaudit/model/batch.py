"""Turning texts and labels into a model batch, with one clear error per bad input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError

Batch = dict[str, torch.Tensor]
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def make_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Tokenize `texts` (right-padded to the longest) with their `labels` for `model`."""
    if len(texts) != len(labels):
        raise GradAuditError(
            f"got {len(texts)} texts but {len(labels)} labels: pass one label per text"
        )
    if not texts:
        raise GradAuditError("no texts given: pass at least one sentence")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise GradAuditError(f"text {i} is empty: every text needs at least one token")
    num_labels = int(model.config.num_labels)
    for i, label in enumerate(labels):
        if not 0 <= int(label) < num_labels:
            raise GradAuditError(
                f"label {label} of text {i} is outside the model's labels 0-{num_labels - 1}: "
                "fix the label or load the model with num_labels to match"
            )
    encoded = tokenizer(list(texts), padding=True, truncation=False, return_tensors="pt")
    limit = int(model.config.max_position_embeddings)
    lengths = encoded["attention_mask"].sum(1)
    if int(lengths.max()) > limit:
        i = int(lengths.argmax())
        raise GradAuditError(
            f"text {i} is {int(lengths[i])} tokens long, more than the model's {limit} positions: "
            "shorten it"
        )
    batch = {k: encoded[k] for k in ("input_ids", "attention_mask")}
    batch["token_type_ids"] = encoded.get("token_type_ids", torch.zeros_like(encoded["input_ids"]))
    batch["labels"] = torch.tensor([int(x) for x in labels], dtype=torch.long)
    return batch


def check_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The known keys of a model batch, with a clear error when input_ids or labels are missing."""
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise GradAuditError(
            f"batch lacks {', '.join(missing)}: gradaudit needs token ids and labels "
            "(the white-box adversary knows the labels)"
        )
    out = {k: batch[k] for k in BATCH_KEYS if k in batch and batch[k] is not None}
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "token_type_ids" not in out:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    return out


def concat_batches(batches: Sequence[Batch], pad_token_id: int = 0) -> Batch:
    """Concatenate micro-batches along the batch axis, right-padding to a common length."""
    width = max(b["input_ids"].shape[1] for b in batches)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}
    out = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t = b[key]
            if t.dim() == 2 and t.shape[1] < width:
                t = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pads.get(key, 0))
            parts.append(t)
        out[key] = torch.cat(parts)
    return out
