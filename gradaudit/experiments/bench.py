"""`gradaudit bench`: the paper's experiment grid on one model, all attacks in one run.

Every cell captures each batch's gradient once and hands the same snapshot to every attack,
so scores and seconds per batch compare fairly (same machine, same load, same inputs).
"""

from __future__ import annotations

import math
import platform
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError
from gradaudit.experiments.data import Examples, load_examples
from gradaudit.gradients.capture import capture
from gradaudit.io import atomic_write_json, private_dir
from gradaudit.model.batch import labels_for, make_batch
from gradaudit.model.families import BERT_COMPONENTS, COMPONENTS, layout
from gradaudit.model.selection import select_modules
from gradaudit.scoring.audit import audit_snapshot
from gradaudit.scoring.metrics import SCORE_KEYS

DATASET_FILES = {
    "cola": "cola/dev.tsv",
    "sst2": "sst2/dev.tsv",
    "rotten_tomatoes": "rotten_tomatoes/test.tsv",
}
# `layer`: every linear module of one layer; `full`: every linear module of the model.
BENCH_COMPONENTS = (*COMPONENTS, "layer", "full")
# A decoder's grid (SmolLM2 has 30 layers): depths from the first to the second-to-last.
DECODER_LAYERS = (0, 1, 5, 15, 28)
DECODER_ATTACKS = ("gradmatch", "causal")  # the attacks that support decoder families
# What makes a cell: its rows (one per batch) are averaged over these.
CELL_KEYS = ("dataset", "component", "layer", "batch_size", "lora_rank", "attack")
LORA_HELD_OUT = 40  # a data set's last sentences, which LoRA models train on and no cell audits


@dataclass
class BenchGrid:
    """Which cells to run; `budgets` maps attack name -> budget (default 1.0).

    With `train_mode`, every gradient is captured in training mode (dropout masks seeded by
    the run's seed and the batch index), as fine-tuning produces it. Each of `lora_ranks` adds
    the grid's cells on the lora_A gradients of a LoRA model of that rank.
    """

    datasets: list[str] = field(default_factory=lambda: list(DATASET_FILES))
    components: list[str] = field(default_factory=lambda: [*BERT_COMPONENTS, "layer", "full"])
    layers: list[int] = field(default_factory=lambda: list(range(6)))
    attacks: list[str] = field(default_factory=lambda: ["gradmatch", "span", "auto"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8])
    sentences: int = 8
    budgets: dict[str, float] = field(default_factory=dict)
    train_mode: bool = False  # dropout on while capturing, as fine-tuning runs
    # LoRA ranks: cells on lora_A of a LoRA-wrapped copy (adapters on the grid's components,
    # trained a few steps, see experiments.lora); `full_model`: also the cells without LoRA.
    lora_ranks: list[int] = field(default_factory=list)
    full_model: bool = True

    @classmethod
    def quick(cls) -> BenchGrid:
        """A subset for a few minutes on 2 CPU cores (gradmatch at a reduced budget)."""
        return cls(
            datasets=["sst2"],
            components=["query", "ffn_in"],
            layers=[0, 2],
            attacks=["gradmatch", "span", "auto"],
            batch_sizes=[1],
            sentences=2,
            budgets={"gradmatch": 0.05},
        )

    @classmethod
    def for_model(cls, model: nn.Module, quick: bool = False) -> BenchGrid:
        """The encoder grid (`quick` or full) for an encoder; for a decoder, its family's
        components x layers 0, 1, 5, 15, 28 x B = 1, 4, 8, 16 with the attacks that support
        decoders (`quick`: one attention and one FFN module at layer 1, B = 1)."""
        lay = layout(model)
        if not lay.family.decoder:
            return cls.quick() if quick else cls()
        components = list(lay.components)
        grid = cls(
            components=components,
            layers=[layer for layer in DECODER_LAYERS if layer < lay.num_layers],
            attacks=list(DECODER_ATTACKS),
            batch_sizes=[1, 4, 8, 16],
        )
        if quick:
            grid.datasets, grid.layers, grid.batch_sizes, grid.sentences = ["sst2"], [1], [1], 2
            grid.components = [components[0], "ffn_in"]
            grid.budgets = {"gradmatch": 0.05}
        return grid

    def cells(self, num_layers: int) -> list[tuple[str, int | None]]:
        """(component, layer) pairs; `full` has no layer."""
        out: list[tuple[str, int | None]] = []
        for component in self.components:
            if component == "full":
                out.append((component, None))
            else:
                out.extend((component, layer) for layer in self.layers if layer < num_layers)
        return out


def module_spec(component: str, layer: int | None, lora_rank: int | None = None) -> str:
    """The module spec of a cell: its lora_A parts when the cell is a LoRA one."""
    spec = "all@all" if component == "full" else f"{component}@{layer}"
    return spec if lora_rank is None else f"{spec}:lora_A"


def _held_out(examples: Examples, grid: BenchGrid) -> tuple[list[str], list[int]]:
    """The last `LORA_HELD_OUT` sentences, which LoRA models train on; an error when a cell
    would audit one of them."""
    audited = max(b * math.ceil(grid.sentences / b) for b in grid.batch_sizes)
    if grid.lora_ranks and len(examples) < audited + LORA_HELD_OUT:
        raise GradAuditError(
            f"{examples.source} has {len(examples)} sentences: LoRA cells need {LORA_HELD_OUT} "
            f"to train the adapters on beyond the {audited} the cells audit; use a larger file"
        )
    return examples.texts[-LORA_HELD_OUT:], examples.labels[-LORA_HELD_OUT:]


def _models(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, grid: BenchGrid, held_out, seed: int
) -> list[tuple[int | None, nn.Module]]:
    """(LoRA rank or None, model) of every model the grid audits on one data set; the LoRA
    copies train on `held_out` (texts, labels), sentences no cell audits."""
    from gradaudit.experiments.lora import lora_model

    targets = [c for c in grid.components if c not in ("layer", "full")]
    models: list[tuple[int | None, nn.Module]] = [(None, model)] if grid.full_model else []
    for rank in grid.lora_ranks:
        models.append((rank, lora_model(model, tokenizer, rank, targets, *held_out, seed=seed)))
    return models


def run_bench(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | Path,
    grid: BenchGrid,
    *,
    seed: int = 0,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every cell of `grid`; return rows (one per batch and attack) and per-cell means."""
    for name in grid.datasets:
        if name not in DATASET_FILES:
            raise GradAuditError(
                f"unknown data set {name!r}: choose from {', '.join(DATASET_FILES)}"
            )
    known = (*layout(model).components, "layer", "full")
    for component in set(grid.components) - set(known):
        raise GradAuditError(f"unknown component {component!r}: choose from {', '.join(known)}")
    rows: list[dict[str, Any]] = []
    num_layers = int(model.config.num_hidden_layers)
    started = time.perf_counter()
    for dataset in grid.datasets:
        examples = load_examples(str(Path(data_dir) / DATASET_FILES[dataset]))
        held_out = _held_out(examples, grid)
        for lora_rank, audited in _models(model, tokenizer, grid, held_out, seed):
            for batch_size in grid.batch_sizes:
                batches = examples.batches(batch_size, math.ceil(grid.sentences / batch_size))
                for component, layer in grid.cells(num_layers):
                    where = {"dataset": dataset, "component": component, "layer": layer}
                    where.update(batch_size=batch_size, lora_rank=lora_rank)
                    for row in _cell_rows(audited, tokenizer, batches, where, grid, seed, device):
                        rows.append(row)
                        if progress is not None:
                            progress(_row_line(row))
    return {
        "grid": asdict(grid),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device or "auto"),
            "machine": platform.machine(),
            "model": str(getattr(model.config, "_name_or_path", "")),
        },
        "seconds_total": time.perf_counter() - started,
        "rows": rows,
        "cells": summarize_cells(rows),
    }


def _cell_rows(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batches: list[tuple[list[str], list[int]]],
    where: dict[str, Any],
    grid: BenchGrid,
    seed: int,
    device: str | None,
) -> Iterator[dict[str, Any]]:
    """One row per batch and attack of the cell `where`: each batch captured once."""
    spec = module_spec(where["component"], where["layer"], where["lora_rank"])
    modules = select_modules(model, spec)
    for index, (texts, labels) in enumerate(batches):
        batch = make_batch(model, tokenizer, texts, labels_for(model, labels))
        snapshot = capture(model, batch, modules, train_mode=grid.train_mode, seed=seed + index)
        for attack in grid.attacks:
            row = {**where, "batch": index, "attack": attack}
            row.update(budget=grid.budgets.get(attack, 1.0), train_mode=grid.train_mode)
            yield {**row, **_attack_cell(model, tokenizer, snapshot, row, seed, device)}


def _attack_cell(model, tokenizer, snapshot, row, seed, device) -> dict[str, Any]:
    try:
        result = audit_snapshot(
            model,
            tokenizer,
            snapshot,
            row["attack"],
            seed=seed,
            device=device,
            budget=row["budget"],
        )
    except GradAuditError as error:  # e.g. a module the attack refuses: that cell's outcome
        return {"error": str(error)}
    except Exception as error:  # noqa: BLE001 - an attack's bug loses one cell, not the run
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error} (an attack bug: please report it)"}
    if result.error is not None:  # e.g. span on a saturated gradient: not attacked, no scores
        return {"error": result.error}
    return {
        **{key: getattr(result, key) for key in SCORE_KEYS},
        "seconds": result.seconds,
        "error": None,
        "ran": result.info.get("auto", {}).get("ran", result.attack),
        "regime": result.info.get("regime"),
        "out_of_time": bool(result.info.get("out_of_time")),
        "info": result.info,  # why a cell is slow or short (unsure places, rough checks, ...)
    }


def _cell_name(cell: dict[str, Any]) -> str:
    """`query@0`, or `query@0:lora_A r=8` for a LoRA cell."""
    spec = module_spec(cell["component"], cell["layer"], cell.get("lora_rank"))
    return spec if cell.get("lora_rank") is None else f"{spec} r={cell['lora_rank']}"


def _row_line(row: dict[str, Any]) -> str:
    where = f"{row['dataset']} {_cell_name(row)} B={row['batch_size']}"
    if row.get("error"):
        return f"{where} {row['attack']}: error: {row['error']}"
    return (
        f"{where} #{row['batch']} {row['attack']}: R1 {row['rouge1']:.3f} R2 {row['rouge2']:.3f} "
        f"{row['seconds']:.1f} s"
    )


def summarize_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean scores and seconds per batch for each (dataset, component, layer, B, attack)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in CELL_KEYS)].append(row)
    cells = []
    for key, members in groups.items():
        ok = [r for r in members if not r.get("error")]
        cell = dict(zip(CELL_KEYS, key))
        cell.update(batches=len(members), errors=len(members) - len(ok))
        cell.update(train_mode=members[0]["train_mode"])
        cell["regimes"] = sorted({r["regime"] for r in ok if r.get("regime")})
        cell["out_of_time"] = sum(1 for r in ok if r.get("out_of_time"))
        for metric in (*SCORE_KEYS, "seconds"):
            cell[metric] = sum(r[metric] for r in ok) / len(ok) if ok else None
        cells.append(cell)
    return cells


def render_table(result: dict[str, Any]) -> str:
    """One line per cell and attack, with its speed against gradmatch where both ran."""
    seconds = {tuple(c.get(k) for k in CELL_KEYS): c["seconds"] for c in result["cells"]}
    budgets = ", ".join(
        f"{a}={result['grid']['budgets'].get(a, 1.0):g}" for a in result["grid"]["attacks"]
    )
    mode = "train (dropout on)" if result["grid"].get("train_mode") else "eval (no dropout)"
    lines = [
        f"gradients captured in {mode} mode; budgets: {budgets} (speed-ups compare these budgets)",
        f"{'dataset':<16}{'module':<22}{'B':>3}  {'attack':<10}{'R1':>7}{'R2':>7}"
        f"{'recall':>8}{'batchR1':>8}{'s/batch':>9}{'vs gradmatch':>14}  regime",
    ]
    for c in result["cells"]:

        def fmt(v, spec=".3f"):
            return "-" if v is None else format(v, spec)

        base = seconds.get(tuple(c.get(k) for k in CELL_KEYS[:-1]) + ("gradmatch",))
        ratio = ""
        if base and c["seconds"] and c["attack"] != "gradmatch":
            speedup = base / c["seconds"]
            ratio = f"{speedup:.1f}x faster" if speedup >= 1 else f"{1 / speedup:.1f}x slower"
        lines.append(
            f"{c['dataset']:<16}{_cell_name(c):<22}{c['batch_size']:>3}  "
            f"{c['attack']:<10}{fmt(c['rouge1']):>7}{fmt(c['rouge2']):>7}"
            f"{fmt(c['token_recall']):>8}{fmt(c.get('batch_rouge1')):>8}"
            f"{fmt(c['seconds'], '.1f'):>9}{ratio:>14}  "
            f"{', '.join(c.get('regimes') or [])}{_cut_short(c)}".rstrip()
        )
    return "\n".join(lines)


def _cut_short(cell: dict[str, Any]) -> str:
    """`; 2 of 4 out of time` for a cell whose searches hit their time limit."""
    cut = cell.get("out_of_time")
    return f"; {cut} of {cell['batches']} out of time" if cut else ""


def write_bench(out: str | Path, result: dict[str, Any]) -> list[Path]:
    """`bench.json` plus ROUGE-1/2 heatmaps (layer x component) per attack and batch size."""
    from gradaudit.report.plots import heatmap_png

    out = private_dir(out)
    written = [atomic_write_json(out / "bench.json", result)]
    by_plot: dict[tuple[str, int, int | None, str], dict[tuple[int, str], list[float]]]
    by_plot = defaultdict(lambda: defaultdict(list))
    for c in result["cells"]:
        if c["layer"] is None or c["rouge1"] is None:
            continue
        for metric in ("rouge1", "rouge2"):
            plot = (c["attack"], c["batch_size"], c.get("lora_rank"), metric)
            by_plot[plot][(c["layer"], c["component"])].append(c[metric])
    for (attack, batch_size, lora_rank, metric), values in by_plot.items():
        layers = sorted({layer for layer, _ in values})
        components = [c for c in BENCH_COMPONENTS if any(comp == c for _, comp in values)]
        matrix = [
            [
                sum(values[(layer, comp)]) / len(values[(layer, comp)])
                if (layer, comp) in values
                else float("nan")
                for comp in components
            ]
            for layer in layers
        ]
        lora = "" if lora_rank is None else f"_lora{lora_rank}"
        path = out / f"heatmap_{attack}_B{batch_size}{lora}_{metric}.png"
        lora_title = "" if lora_rank is None else f", lora_A of LoRA r={lora_rank}"
        heatmap_png(
            path,
            matrix,
            rows=[f"layer {layer}" for layer in layers],
            columns=components,
            title=f"{attack}, B={batch_size}{lora_title}: {metric.upper()}",
        )
        written.append(path)
    return written
