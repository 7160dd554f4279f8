"""`scan`: which linear modules' gradients leak through their span, without any attack.

One capture of all selected modules, one SVD each: the numerical rank next to the batch's
token count and the rank's bound (its rows; a LoRA lora_A's r), the module's share of the
model's parameters, and a label from `spectrum.label`: `exact`, `span`, `partial`,
`rank-limited`, `saturated` or `zero`. `exact` needs BERT-style embeddings at layer 0; GPT-2's
`Conv1D` gradients are read as `nn.Linear`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from gradaudit.attacks.span.attack import module_bounds, module_labels
from gradaudit.gradients.capture import capture
from gradaudit.gradients.spectrum import spectrum
from gradaudit.model.families import layout
from gradaudit.model.linear import conv1d_names

# A line under the table for each label that needs words (LoRA's regimes among them).
LABEL_NOTES = {
    "exact": "exact: rank < bound, every input in the row space; layer 0 is solved exactly",
    "span": "span: rank < bound, every input in the row space (span exact regime)",
    "partial": (
        "partial: rank = bound < tokens (e.g. lora_A with r < tokens): the row space is a "
        "bound-dimensional slice of the inputs' span; span partial regime: the inputs must "
        "span it"
    ),
}


@dataclass(frozen=True)
class ScanRow:
    """One module's gradient spectrum summary."""

    module: str
    rank: int
    rank_above_rounding: int  # with the weaker directions past the rank's gap (see spectrum)
    tokens: int
    width: int
    bound: int  # the most rank whatever the tokens: its rows, or a lora_A's lora_B rank (<= r)
    param_share: float
    clean: bool
    label: str


def scan(
    model: nn.Module, batch: Mapping[str, torch.Tensor], modules: Iterable[str]
) -> list[ScanRow]:
    """Rank, token count, parameter share and label of each module's weight gradient."""
    modules = list(modules)
    snapshot = capture(model, batch, modules).as_linear(conv1d_names(model))  # (out, in)
    lay = layout(model)
    tokens = int(snapshot.batch["attention_mask"].sum())
    total = sum(p.numel() for p in model.parameters())
    spectra = {m: spectrum(snapshot.weight_gradient(m), noisy=False, name=m) for m in modules}
    bounds = module_bounds(model, spectra)
    labels = module_labels(model, spectra, tokens, lay, bounds)
    if not lay.bert_embeddings:  # exact mode needs BERT-style layer-0 embeddings
        labels = {m: "span" if lab == "exact" else lab for m, lab in labels.items()}
    rows = []
    for name, spec in spectra.items():
        rows.append(
            ScanRow(
                module=name,
                rank=spec.rank,
                rank_above_rounding=spec.rank_above_rounding,
                tokens=tokens,
                width=spec.width,
                bound=bounds[name],
                param_share=spec.rows * spec.width / total,
                clean=spec.clean,
                label=labels[name],
            )
        )
    return rows


def to_table(rows: list[ScanRow]) -> str:
    """A plain-text table, one module per line; a rank reads `71 (74)` where weaker
    directions stand above the rounding past the rank's gap."""
    name_width = max([len("module")] + [len(r.module) for r in rows])
    lines = [f"{'module':<{name_width}}       rank  tokens  bound  width  params  label"]
    for r in rows:
        rank = str(r.rank)
        if r.rank_above_rounding != r.rank:
            rank += f" ({r.rank_above_rounding})"
        lines.append(
            f"{r.module:<{name_width}}  {rank:>9}  {r.tokens:>6}  {r.bound:>5}  {r.width:>5}  "
            f"{r.param_share:>6.2%}  {r.label}"
        )
    lines.extend(LABEL_NOTES[label] for label in LABEL_NOTES if any(r.label == label for r in rows))
    return "\n".join(lines)


def to_json(rows: list[ScanRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
