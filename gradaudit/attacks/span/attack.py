"""The `span` attack: the row space of a linear module's weight gradient spans its inputs.

`G = sum_t delta_t x_t^T` has rank at most the number of tokens; below the input width its row
space is a label-free, backward-free constraint on what the inputs were. Layer-0 query, key and
value of an absolute-position encoder are solved exactly (`exact.solve`), any other module with
a usable span by a search over the model's own forward pass (`deep.solve`). A rank-limited or
saturated gradient is reported, not attacked (or, saturated, handed to gradmatch if asked).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks.base import (
    SPAN_EXACT,
    SPAN_PARTIAL,
    Attack,
    Reconstruction,
    blank_ids,
    from_ids,
)
from gradaudit.attacks.registry import get_attack
from gradaudit.attacks.span.deep.solve import solve_deep
from gradaudit.attacks.span.exact.dropout import embedding_dropout
from gradaudit.attacks.span.exact.saturation import saturation_statement
from gradaudit.attacks.span.exact.screening import exact_applicable
from gradaudit.attacks.span.exact.solve import solve_exact
from gradaudit.attacks.span.exact.train import solve_train
from gradaudit.attacks.span.options import SpanOptions
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.gradients.spectrum import Spectrum, label, spectrum
from gradaudit.model.families import ModelLayout, layout
from gradaudit.model.lora import combined_dropout, lora_part, rank_bound

USABLE = ("exact", "span", "partial")  # the labels whose row space constrains the inputs


def module_spectra(
    model: nn.Module, snapshot: GradientSnapshot, min_gap: float, device: torch.device
) -> dict[str, Spectrum]:
    """Spectrum of every observed module (NaN/inf raise, naming the module)."""
    noisy = snapshot.kind == "noised"
    return {
        m: spectrum(snapshot.weight_gradient(m).to(device), noisy=noisy, min_gap=min_gap, name=m)
        for m in snapshot.modules
    }


def module_bounds(model: nn.Module, spectra: dict[str, Spectrum]) -> dict[str, int]:
    """Each observed module's rank bound: its rows, or a lora_A's lora_B rank."""
    return {m: rank_bound(model, m, s.rows) for m, s in spectra.items()}


def module_labels(
    model: nn.Module,
    spectra: dict[str, Spectrum],
    tokens: int,
    lay: ModelLayout,
    bounds: dict[str, int] | None = None,
) -> dict[str, str]:
    """Each observed module's `spectrum.label`, with its rank bound (`module_bounds` unless
    given)."""
    bounds = module_bounds(model, spectra) if bounds is None else bounds
    return {m: label(s, tokens, exact_applicable(lay, m), bounds[m]) for m, s in spectra.items()}


def unusable_reason(labels: dict[str, str]) -> str:
    """Why no module's gradient can be attacked, from the modules' spectrum labels ("" if one
    can)."""
    if set(labels.values()) <= {"saturated", "zero"}:
        return "saturated: the gradient has full rank, so its span constrains nothing"
    limited = [m for m, lab in labels.items() if lab == "rank-limited"]
    if limited:
        return (
            f"rank-limited: {', '.join(limited)} have rank far below the tokens (at "
            "the last layer of a sequence classifier only [CLS] reaches the head), so they "
            "cannot leak the other tokens"
        )
    return ""


def regime_of(usable: dict[str, Spectrum], labels: dict[str, str], tokens: int) -> dict[str, str]:
    """`regime` (span exact or span partial) of a span attack on the `usable` modules, and
    `regime_why`."""
    partial = sorted(m for m in usable if labels[m] == "partial")
    if not partial:
        return {
            "regime": SPAN_EXACT,
            "regime_why": (
                f"no more tokens ({tokens}) than each gradient's rows: its row space is the "
                "span of the inputs, so every input lies in it"
            ),
        }
    ranks = ", ".join(f"{m} rank {usable[m].rank}" for m in partial)
    return {
        "regime": SPAN_PARTIAL,
        "regime_why": (
            f"{ranks}, its bound (rows, or lora_B's rank for lora_A), < tokens ({tokens}): a "
            "slice of the inputs' span, so only the reverse test holds (the inputs must span it)"
        ),
    }


def lora_dropout_note(
    model: nn.Module, snapshot: GradientSnapshot, modules: list[str], exact: bool
) -> dict[str, str]:
    """`{"lora_dropout": ...}`: whether the attack modelled the observed LoRA parts'
    `lora_dropout`, when the gradient was taken with it on."""
    parts = [lora_part(model, m) for m in modules]
    rate = max((p.dropout for p in parts if p is not None), default=0.0)
    if not dropout_on(model, snapshot, rate):
        return {}
    how = (
        "modelled: composed with the embedding dropout in the exact test"
        if exact
        else "not modelled: deep mode scores inputs without dropout"
    )
    return {"lora_dropout": f"lora_dropout {rate:g} {how}"}


def model_dropout(model: nn.Module) -> float:
    """The largest dropout rate of the model's dropout layers (0.0 without any)."""
    return max((m.p for m in model.modules() if isinstance(m, nn.Dropout)), default=0.0)


def dropout_on(model: nn.Module, snapshot: GradientSnapshot, rate: float) -> bool:
    """Whether the gradient was taken with dropout (of `rate`) on: as its capture recorded it,
    else as the model's mode says now (a training loop's own gradient, e.g. the Auditor's)."""
    train = snapshot.meta.get("train_mode")
    return rate > 0 and bool(model.training if train is None else train)


def saturation(
    model: nn.Module,
    snapshot: GradientSnapshot,
    lay: ModelLayout,
    spectra: dict[str, Spectrum],
    labels: dict[str, str],
) -> dict[str, Any]:
    """`{"saturation": statement}` when a layer-0 query/key/value gradient is saturated."""
    saturated = [m for m, lab in labels.items() if lab == "saturated" and exact_applicable(lay, m)]
    if not saturated:
        return {}
    train = dropout_on(model, snapshot, embedding_dropout(lay)[0])
    return {"saturation": saturation_statement(spectra[saturated[0]], snapshot.batch, train)}


class SpanAttack(Attack):
    """Recover tokens from the row space of linear-module weight gradients."""

    name = "span"
    Options = SpanOptions

    def _reconstruct(
        self,
        model: nn.Module,
        snapshot: GradientSnapshot,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        device: torch.device,
        budget: float,
    ) -> Reconstruction:
        opts = self.options
        lay = layout(model)
        spectra = module_spectra(model, snapshot, opts.min_gap, device)
        tokens = int(snapshot.batch["attention_mask"].sum())
        info: dict[str, Any] = {
            "spectra": {m: s.summary() for m, s in spectra.items()},
            "tokens": tokens,
        }
        ids = blank_ids(snapshot, tokenizer)
        labels = module_labels(model, spectra, tokens, lay)
        info["labels"] = labels
        usable = {m: spectra[m] for m, lab in labels.items() if lab in USABLE}
        why = unusable_reason(labels)
        if not usable:
            if why.startswith("saturated") and opts.saturated == "gradmatch":
                result = get_attack("gradmatch").reconstruct(
                    model, snapshot, tokenizer=tokenizer, seed=seed, device=device, budget=budget
                )
                result.info.update(info, mode="gradmatch", why=why)
                return result
            info.update(mode="none", why=why, **saturation(model, snapshot, lay, spectra, labels))
            return self._result(tokenizer, snapshot, ids, info)
        info.update(regime_of(usable, labels, tokens))
        found = self._exact(model, snapshot, lay, usable, labels, tokenizer, ids, info)
        info.update(lora_dropout_note(model, snapshot, list(usable), found is not None))
        if found is not None:
            ids = found
        else:
            partial = info["regime"] == SPAN_PARTIAL
            noisy = dropout_on(model, snapshot, model_dropout(model))
            ids, details = solve_deep(
                model, snapshot, lay, usable, tokenizer, seed, budget, opts, partial, noisy
            )
            info.update(mode="deep", modules=sorted(usable), **details)
            info["why"] = f"{', '.join(sorted(usable))}: rank below the width; deep mode (the "
            info["why"] += "model's own forward pass to each module)"
        return self._result(tokenizer, snapshot, ids, info)

    def _exact(
        self,
        model: nn.Module,
        snapshot: GradientSnapshot,
        lay: ModelLayout,
        usable: dict[str, Spectrum],
        labels: dict[str, str],
        tokenizer: PreTrainedTokenizerBase,
        ids: torch.Tensor,
        info: dict[str, Any],
    ) -> torch.Tensor | None:
        """Exact mode on the lowest-rank layer-0 module, recorded in `info`; None where it
        cannot run (no such module, or dropout it cannot model)."""
        exact = [m for m in usable if labels[m] == "exact"]
        if not exact:
            return None
        module = min(exact, key=lambda m: usable[m].rank)
        spec = usable[module]
        rate, cannot = embedding_dropout(lay)
        rate = combined_dropout(rate, lora_part(model, module))
        train = dropout_on(model, snapshot, rate)
        if train and cannot:
            info["dropout"] = f"cannot model this model's dropout: {cannot}; deep mode instead"
            return None
        if train:
            opts = self.options
            ids, details = solve_train(
                model, snapshot, lay, module, spec, tokenizer, ids, opts.chunk, rate
            )
            info.update(mode="exact", module=module, train_mode=True, **details)
        else:
            ids, details = solve_exact(
                model, snapshot, lay, module, spec, tokenizer, ids, self.options
            )
            info.update(mode="exact", module=module, **details)
        info["why"] = f"{module} takes a per-token input (layer 0) and its gradient has rank "
        info["why"] += f"{spec.rank} < width {spec.width}"
        return ids

    def _result(
        self,
        tokenizer: PreTrainedTokenizerBase,
        snapshot: GradientSnapshot,
        ids: torch.Tensor,
        info: dict[str, Any],
    ) -> Reconstruction:
        return from_ids(tokenizer, snapshot, ids, self.name, self.options_dict(), info)
