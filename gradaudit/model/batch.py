"""Turning texts and labels into a model batch, with one clear error per bad input.

A sequence classifier takes one label per text. A causal language model (`LlamaForCausalLM`,
`GPT2LMHeadModel`, ...) learns each text's own tokens: its labels are the input ids, with
padding set to -100 (ignored by the loss, which shifts them by one inside the model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError
from gradaudit.model.families import find_family, is_causal_lm

Batch = dict[str, torch.Tensor]
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
IGNORED_LABEL = -100  # what the loss skips


def _check_texts(texts: Sequence[str], labels: Sequence[int] | None) -> None:
    if labels is not None and len(texts) != len(labels):
        raise GradAuditError(
            f"got {len(texts)} texts but {len(labels)} labels: pass one label per text"
        )
    if not texts:
        raise GradAuditError("no texts given: pass at least one sentence")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise GradAuditError(f"text {i} is empty: every text needs at least one token")


def _class_labels(model: nn.Module, labels: Sequence[int] | None) -> torch.Tensor:
    if labels is None:
        raise GradAuditError(
            f"labels=None is for causal language models, and {type(model).__name__} is a "
            "sequence classifier: pass one label per text"
        )
    num_labels = int(model.config.num_labels)
    for i, label in enumerate(labels):
        if not 0 <= int(label) < num_labels:
            raise GradAuditError(
                f"label {label} of text {i} is outside the model's labels 0-{num_labels - 1}: "
                "fix the label or load the model with num_labels to match"
            )
    return torch.tensor([int(x) for x in labels], dtype=torch.long)


def causal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A causal LM's labels: the input ids, with padding ignored (-100)."""
    return input_ids.masked_fill(attention_mask == 0, IGNORED_LABEL)


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> dict:
    """Right-padded encodings; a clear error when a batch needs padding the tokenizer lacks."""
    pad = len(texts) > 1
    if pad and tokenizer.pad_token is None:
        raise GradAuditError(
            f"the tokenizer has no pad token, so a batch of {len(texts)} texts cannot be padded: "
            "set one, e.g. tokenizer.pad_token = tokenizer.eos_token (padding is masked out and "
            "its labels ignored), or use batch size 1"
        )
    if not pad:
        return tokenizer(list(texts), truncation=False, return_tensors="pt")
    return tokenizer(
        list(texts), padding=True, padding_side="right", truncation=False, return_tensors="pt"
    )


def check_length(model: nn.Module, attention_mask: torch.Tensor) -> None:
    """A clear error when a sequence is longer than the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    lengths = attention_mask.sum(1)
    if limit is not None and int(lengths.max()) > int(limit):
        i = int(lengths.argmax())
        raise GradAuditError(
            f"text {i} is {int(lengths[i])} tokens long, more than the model's {limit} positions: "
            f"shorten it (e.g. tokenize with truncation=True, max_length={limit})"
        )


def make_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize `texts` (right-padded to the longest) with their labels for `model`.

    A sequence classifier needs one label per text; a causal LM takes `labels=None` (each text
    is its own label: the input ids, padding -100).
    """
    _check_texts(texts, labels)
    causal = is_causal_lm(model)
    if causal and labels is not None:
        raise GradAuditError(
            f"{type(model).__name__} is a causal language model: its labels are the texts' own "
            "tokens, so pass labels=None"
        )
    label_tensor = None if causal else _class_labels(model, labels)
    encoded = _tokenize(tokenizer, texts)
    check_length(model, encoded["attention_mask"])
    batch = {k: encoded[k] for k in ("input_ids", "attention_mask")}
    batch["token_type_ids"] = encoded.get("token_type_ids", torch.zeros_like(encoded["input_ids"]))
    if causal:
        label_tensor = causal_labels(batch["input_ids"], batch["attention_mask"])
    batch["labels"] = label_tensor
    return batch


def labels_for(model: nn.Module, labels: Sequence[int] | None) -> Sequence[int] | None:
    """The labels a data set's examples give `model`: None for a causal LM (each text is its
    own label), else `labels` (a data file's class labels)."""
    return None if is_causal_lm(model) else labels


def check_batch(batch: dict[str, torch.Tensor], model: nn.Module | None = None) -> Batch:
    """The known keys of a model batch, with a clear error when input_ids or labels are missing.

    With `model`: a causal LM's missing labels are its input ids (padding -100), and a
    sequence longer than the model's context is refused. Padding, left or right, is kept as
    the model saw it: with left padding the shifted loss also predicts each row's first token
    from the last pad, so moving the tokens would change the gradient.
    """
    causal = model is not None and is_causal_lm(model)
    if causal and "input_ids" in batch and batch.get("labels") is None:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        batch = {**batch, "labels": causal_labels(batch["input_ids"], mask)}
    missing = [k for k in ("input_ids", "labels") if batch.get(k) is None]
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
    if model is not None:
        check_length(model, out["attention_mask"])
    return out


def model_inputs(model: nn.Module, batch: Batch) -> Batch:
    """The batch as `model`'s forward takes it: token types only where the family has them.

    (GPT-2 would add its word embedding of token type 0 to every token; Llama has none.)
    """
    family = find_family(model)
    if family is not None and family.token_type_embeddings is None:
        return {k: v for k, v in batch.items() if k != "token_type_ids"}
    return dict(batch)


def ignore_absent_inputs(model: nn.Module) -> None:
    """Make `model` (a private copy) drop `token_type_ids` where its family has none, so code
    passing a batch's zero token types computes what `model_inputs` gives it."""
    family = find_family(model)
    if family is not None and family.token_type_embeddings is None:
        model.register_forward_pre_hook(_drop_token_types, with_kwargs=True)


def _drop_token_types(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs.pop("token_type_ids", None)
    return args, kwargs


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
