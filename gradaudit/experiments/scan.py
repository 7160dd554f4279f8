"""`scan`: which linear modules' gradients leak through their span, without any attack.

One capture of all selected modules, one SVD each: the numerical rank next to the batch's
token count, the module's share of the model's parameters, and a label from
`spectrum.label`: `exact`, `span`, `rank-limited`, `saturated` or `zero`. `exact` needs
BERT-style embeddings at layer 0; GPT-2's `Conv1D` gradients are read as `nn.Linear`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from gradaudit.attacks.span.exact.screening import exact_applicable
from gradaudit.gradients.capture import capture
from gradaudit.gradients.spectrum import label, spectrum
from gradaudit.model.families import layout
from gradaudit.model.linear import conv1d_names


@dataclass(frozen=True)
class ScanRow:
    """One module's gradient spectrum summary."""

    module: str
    rank: int
    rank_above_rounding: int  # with the weaker directions past the rank's gap (see spectrum)
    tokens: int
    width: int
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
    rows = []
    for name in modules:
        grad = snapshot.weight_gradient(name)
        spec = spectrum(grad, noisy=False, name=name)
        rows.append(
            ScanRow(
                module=name,
                rank=spec.rank,
                rank_above_rounding=spec.rank_above_rounding,
                tokens=tokens,
                width=spec.width,
                param_share=grad.numel() / total,
                clean=spec.clean,
                label=label(spec, tokens, lay.bert_embeddings and exact_applicable(lay, name)),
            )
        )
    return rows


def to_table(rows: list[ScanRow]) -> str:
    """A plain-text table, one module per line; a rank reads `71 (74)` where weaker
    directions stand above the rounding past the rank's gap."""
    name_width = max([len("module")] + [len(r.module) for r in rows])
    lines = [f"{'module':<{name_width}}       rank  tokens  width  params  label"]
    for r in rows:
        rank = str(r.rank)
        if r.rank_above_rounding != r.rank:
            rank += f" ({r.rank_above_rounding})"
        lines.append(
            f"{r.module:<{name_width}}  {rank:>9}  {r.tokens:>6}  {r.width:>5}  "
            f"{r.param_share:>6.2%}  {r.label}"
        )
    return "\n".join(lines)


def to_json(rows: list[ScanRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
