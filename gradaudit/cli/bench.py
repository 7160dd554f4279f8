"""`gradaudit bench`: the paper's grid in one run (ratios are fair), or `--overhead`."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm.auto import tqdm

from gradaudit.cli.common import (
    add_budget_argument,
    add_list_argument,
    add_model_argument,
    add_run_arguments,
)
from gradaudit.errors import GradAuditError


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="the paper's grid: data sets x modules x attacks x B")
    add_model_argument(parser, default="minilm")
    parser.add_argument("--data-dir", help="folder with cola/, sst2/, rotten_tomatoes/ files")
    parser.add_argument("--quick", action="store_true", help="a small subset: minutes on 2 CPUs")
    parser.add_argument(
        "--overhead", action="store_true", help="training step time with and without the auditor"
    )
    add_list_argument(parser, "--datasets", "data sets of the grid: cola sst2 rotten_tomatoes")
    add_list_argument(
        parser,
        "--components",
        "components: query ... ffn_out layer full (a decoder's grid: its components)",
    )
    parser.add_argument(
        "--layers",
        help="one layer spec, as in module specs: 0-5, 0,2 or all (decoder: 0,1,5,15,28)",
    )
    add_list_argument(parser, "--attacks", "attacks compared in one run, e.g. gradmatch span auto")
    add_list_argument(parser, "--batch-sizes", "batch sizes, e.g. 1 4 8")
    parser.add_argument("--sentences", type=int, help="sentences per cell")
    parser.add_argument(
        "--train-mode",
        action="store_true",
        help="capture gradients in training mode, dropout on, as fine-tuning does",
    )
    add_list_argument(
        parser,
        "--lora",
        "LoRA ranks, e.g. 8 16 64 256: adds cells on lora_A of a LoRA model of each rank "
        "(adapters on the grid's components, trained a few steps first; needs peft)",
    )
    parser.add_argument(
        "--lora-only", action="store_true", help="with --lora: leave out the cells without LoRA"
    )
    add_budget_argument(parser)
    add_run_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=Path("bench-out"), help="folder for bench.json and heatmaps"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gradaudit.experiments.bench import render_table, run_bench, write_bench
    from gradaudit.model.loading import load_model

    model, tokenizer = load_model(args.model)
    if args.overhead:
        return run_overhead(model, tokenizer, args)
    grid = _grid(args, model)
    if args.data_dir is None or not Path(args.data_dir).is_dir():
        raise GradAuditError(
            f"--data-dir {args.data_dir} is not a folder: pass the folder holding cola/dev.tsv, "
            "sst2/dev.tsv and rotten_tomatoes/test.tsv (../shared/data in this repo's checkout)"
        )
    progress = None if args.quiet else tqdm.write
    result = run_bench(
        model, tokenizer, args.data_dir, grid, seed=args.seed, device=args.device, progress=progress
    )
    print(render_table(result))
    written = write_bench(args.out, result)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _grid(args: argparse.Namespace, model):
    """The model's bench grid (an encoder's or a decoder's): `--quick` or the full one,
    narrowed by the flags given."""
    from gradaudit.experiments.bench import BenchGrid
    from gradaudit.model.selection import parse_layers

    num_layers = int(model.config.num_hidden_layers)
    grid = BenchGrid.for_model(model, quick=args.quick)
    for name in ("datasets", "components", "attacks"):
        if getattr(args, name):
            setattr(grid, name, getattr(args, name))
    if args.layers:
        grid.layers = parse_layers(args.layers, num_layers)
    if args.batch_sizes:
        grid.batch_sizes = [_positive(b, "--batch-sizes") for b in args.batch_sizes]
    if args.sentences:
        grid.sentences = args.sentences
    grid.budgets.update(dict(args.attack_budget))
    grid.train_mode = args.train_mode
    grid.lora_ranks = [_positive(r, "--lora") for r in args.lora or []]
    if args.lora_only and not grid.lora_ranks:
        raise GradAuditError("--lora-only needs --lora R [R ...]: the LoRA ranks to audit")
    grid.full_model = not args.lora_only
    return grid


def run_overhead(model, tokenizer, args: argparse.Namespace) -> int:
    """`bench --overhead`: the same fine-tuning with and without the auditor, in one run."""
    from gradaudit.experiments.data import load_examples
    from gradaudit.experiments.overhead import measure_overhead
    from gradaudit.io import atomic_write_json

    if args.data_dir is None:
        raise GradAuditError("--overhead needs --data-dir (the folder holding sst2/dev.tsv)")
    examples = load_examples(str(Path(args.data_dir) / "sst2" / "dev.tsv"))
    overhead = measure_overhead(model, tokenizer, examples.texts, examples.labels, seed=args.seed)
    result = overhead.to_dict()
    print(
        f"step time, capture only / no auditor: {overhead.capture_ratio:.3f} (target <= 1.02)\n"
        f"step p95, background attacks / attacks off: {overhead.background_p95_ratio:.3f} "
        "(target <= 1.10)"
    )
    print(f"wrote {atomic_write_json(Path(args.out) / 'overhead.json', result)}")
    return 0


def _positive(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise GradAuditError(f"{flag} takes whole numbers of at least 1, got {text!r}")
    return int(text)
