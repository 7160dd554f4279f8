"""The `gradaudit` command line: audit, attack (more commands register themselves below)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gradaudit.errors import GradAuditError


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs to attack options; values parse as JSON where they can."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise GradAuditError(f"option {pair!r} is not key=value, e.g. --option steps=200")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--attack-budget",
        action="append",
        default=[],
        type=_budget_pair,
        metavar="ATTACK=BUDGET",
        help="budget for one attack, e.g. gradmatch=0.1 (default 1)",
    )


def _budget_pair(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if sep and name:
            return name, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not ATTACK=BUDGET, e.g. gradmatch=0.1")


def add_attack_arguments(
    parser: argparse.ArgumentParser, default_attack: str = "gradmatch"
) -> None:
    parser.add_argument(
        "--attack", default=default_attack, help="attack name (default %(default)s)"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="attack option, repeatable (e.g. steps=500)",
    )
    parser.add_argument("--budget", type=float, default=1.0, help="scales the attack's step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the report")
    parser.add_argument("--redact", action="store_true", help="keep scores only, no text")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars or per-sentence lines"
    )


def print_result(result) -> None:
    """Per-sentence reconstructions with their ROUGE, then the batch scores."""
    for s in result.sentences:
        tqdm.write(f"  R1 {s['rouge1']:.2f} R2 {s['rouge2']:.2f}")
        tqdm.write(f"    reference:      {result.references[s['reference']]}")
        tqdm.write(f"    reconstruction: {result.reconstructions[s['reconstruction']]}")
    tqdm.write(
        f"  batch: ROUGE-1 {result.rouge1:.3f} ROUGE-2 {result.rouge2:.3f} "
        f"token recall {result.token_recall:.3f} in {result.seconds:.1f} s"
    )


def print_report_paths(path: Path) -> None:
    print(f"report: {path.with_suffix('.html')} (also report.json, report.md)")


def cmd_audit(args: argparse.Namespace) -> int:
    from gradaudit.attacks import get_attack
    from gradaudit.experiments.data import load_examples
    from gradaudit.model.loading import load_model
    from gradaudit.model.selection import select_modules
    from gradaudit.report import build_report, write_report
    from gradaudit.scoring.audit import audit_batch

    options = parse_options(args.option)
    get_attack(args.attack, **options)  # a bad attack, option or module fails before any work
    model, tokenizer = load_model(args.model)
    modules = select_modules(model, args.modules)
    batches = load_examples(args.data).batches(args.batch_size, args.limit)
    results = []
    for i, (texts, labels) in enumerate(tqdm(batches, desc="audit", disable=args.quiet)):
        result = audit_batch(
            model,
            tokenizer,
            texts,
            labels,
            modules,
            args.attack,
            seed=args.seed + i,
            device=args.device,
            budget=args.budget,
            **options,
        )
        results.append(result)
        if not args.quiet:
            tqdm.write(f"batch {i}:")
            print_result(result)
    config = {"command": "audit", **{k: v for k, v in vars(args).items() if k != "func"}}
    config["out"] = str(args.out)
    print_report_paths(
        write_report(args.out, build_report(results, config=config, redact=args.redact))
    )
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    """Attack saved snapshots, sharded across ranks under torchrun or accelerate launch.

    With RANK and WORLD_SIZE set, rank i attacks snapshots i, i + k, ... and rank 0 writes
    the merged report.
    """
    import os

    import torch

    from gradaudit.capture.snapshot import GradientSnapshot
    from gradaudit.model.loading import load_model
    from gradaudit.report import build_report, write_report
    from gradaudit.scoring.audit import audit_snapshot
    from gradaudit.scoring.result import AuditResult

    options = parse_options(args.option)
    root = Path(args.snapshots)
    dirs = (
        [root]
        if (root / "snapshot.json").is_file()
        else sorted(p.parent for p in root.glob("*/snapshot.json"))
    )
    if not dirs:
        raise GradAuditError(f"{root} holds no snapshot (no snapshot.json in it or its subfolders)")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # CPU collectives: only result lists travel
        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    model, tokenizer = load_model(args.model)
    results: list[tuple[int, AuditResult]] = []
    mine = list(enumerate(dirs))[rank::world]
    for i, directory in tqdm(mine, desc=f"attack (rank {rank})", disable=args.quiet):
        try:
            snapshot = GradientSnapshot.load(directory, model)
            result = audit_snapshot(
                model,
                tokenizer,
                snapshot,
                args.attack,
                seed=args.seed + i,  # by global index: sharded runs match a single one
                device=device,
                budget=args.budget,
                **options,
            )
        except Exception as error:
            if world == 1:
                raise
            # One rank's failure must not leave the others waiting at the gather.
            result = AuditResult(
                modules=[], attack=args.attack, batch_size=0, error=f"{directory}: {error}"
            )
        results.append((i, result))
        if not args.quiet and result.error is None:
            tqdm.write(f"{directory}:")
            print_result(result)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        dist.destroy_process_group()
        if rank != 0:
            return 0
        results = sorted((pair for part in gathered for pair in part), key=lambda p: p[0])
    config = {
        "command": "attack",
        "model": args.model,
        "snapshots": str(root),
        "attack": args.attack,
        "options": options,
        "budget": args.budget,
        "seed": args.seed,
        "world_size": world,
    }
    report = build_report([r for _, r in results], config=config, redact=args.redact)
    print_report_paths(write_report(args.out, report))
    return 0


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def bench_overhead(model, tokenizer, args: argparse.Namespace) -> int:
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


def cmd_bench(args: argparse.Namespace) -> int:
    from gradaudit.experiments.bench import BenchGrid, render_table, run_bench, write_bench
    from gradaudit.model.loading import load_model
    from gradaudit.model.selection import parse_layers

    model, tokenizer = load_model(args.model)
    if args.overhead:
        return bench_overhead(model, tokenizer, args)
    grid = BenchGrid.quick() if args.quick else BenchGrid()
    for name in ("datasets", "components", "attacks"):
        if getattr(args, name):
            setattr(grid, name, _csv(getattr(args, name)))
    if args.layers:
        grid.layers = parse_layers(args.layers, int(model.config.num_hidden_layers))
    if args.batch_sizes:
        grid.batch_sizes = [int(b) for b in _csv(args.batch_sizes)]
    if args.sentences:
        grid.sentences = args.sentences
    grid.budgets.update(dict(args.attack_budget))
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


def cmd_report(args: argparse.Namespace) -> int:
    from gradaudit.report import read_report, redact_report, write_report

    report = read_report(args.dir)
    if args.redact:
        report = redact_report(report)
    path = write_report(args.dir, report)
    if args.open:
        print(path.with_suffix(".html").resolve())
    else:
        print_report_paths(path)
    return 0


def cmd_dpsweep(args: argparse.Namespace) -> int:
    from gradaudit.experiments.data import load_examples
    from gradaudit.experiments.dpsweep import (
        SweepSettings,
        parse_floats,
        render_table,
        run_dpsweep,
        write_dpsweep,
    )
    from gradaudit.model.loading import load_model

    budgets = dict(args.attack_budget)
    settings = SweepSettings(
        modules=args.modules,
        sigmas=parse_floats(args.sigmas),
        clip=args.clip,
        sample_rate=args.sample_rate,
        steps=args.steps,
        delta=args.delta,
        accountant=args.accountant,
        attacks=_csv(args.attacks),
        budgets=budgets,
        batch_size=args.batch_size,
        batches=args.batches,
        clip_scope=args.clip_scope,
        utility_steps=args.utility,
        utility_lr=args.utility_lr,
        eval_size=args.eval_size,
        seed=args.seed,
    )
    settings.check()  # before loading anything
    model, tokenizer = load_model(args.model)
    progress = None if args.quiet else tqdm.write
    result = run_dpsweep(
        model, tokenizer, load_examples(args.data), settings, device=args.device, progress=progress
    )
    print(render_table(result))
    written = write_dpsweep(args.out, result, redact=args.redact)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from gradaudit.experiments.data import load_examples
    from gradaudit.experiments.scan import scan, to_json, to_table
    from gradaudit.io import atomic_write_text
    from gradaudit.model.batch import make_batch
    from gradaudit.model.loading import load_model
    from gradaudit.model.selection import select_modules

    model, tokenizer = load_model(args.model)
    texts, labels = load_examples(args.data).batches(args.batch_size, 1)[0]
    rows = scan(
        model, make_batch(model, tokenizer, texts, labels), select_modules(model, args.modules)
    )
    print(to_table(rows))
    if args.out is not None:
        atomic_write_text(args.out / "scan.json", to_json(rows) + "\n")
        atomic_write_text(args.out / "scan.txt", to_table(rows) + "\n")
        print(f"wrote {args.out / 'scan.json'} and {args.out / 'scan.txt'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradaudit", description="Audit training-text leakage from partial gradients."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    audit = sub.add_parser("audit", help="attack batches of a data set and write a report")
    audit.add_argument("--model", required=True, help="minilm, a local folder or a hub name")
    audit.add_argument("--data", required=True, help="TSV/CSV/JSONL path or glue/sst2, ...")
    audit.add_argument("--modules", nargs="+", required=True, help="module specs, e.g. query@0")
    audit.add_argument("--batch-size", type=int, default=1)
    audit.add_argument("--limit", type=int, default=None, help="number of batches")
    add_attack_arguments(audit)
    audit.set_defaults(func=cmd_audit)

    attack = sub.add_parser("attack", help="attack saved gradient snapshots")
    attack.add_argument("snapshots", help="a snapshot directory or a folder of them")
    attack.add_argument("--model", required=True)
    add_attack_arguments(attack)
    attack.set_defaults(func=cmd_attack)

    scan = sub.add_parser("scan", help="no attack: gradient rank and leak label per module")
    scan.add_argument("--model", required=True)
    scan.add_argument("--data", required=True)
    scan.add_argument("--modules", nargs="+", default=["all@all"])
    scan.add_argument("--batch-size", type=int, default=1, help="sentences in the scanned batch")
    scan.add_argument("--out", type=Path, default=None, help="also write scan.json/scan.txt here")
    scan.set_defaults(func=cmd_scan)

    bench = sub.add_parser("bench", help="the paper's grid: data sets x modules x attacks x B")
    bench.add_argument("--model", default="minilm")
    bench.add_argument("--data-dir", help="folder with cola/, sst2/, rotten_tomatoes/ files")
    bench.add_argument("--quick", action="store_true", help="a small subset: minutes on 2 CPUs")
    bench.add_argument(
        "--overhead", action="store_true", help="training step time with and without the auditor"
    )
    bench.add_argument("--datasets", help="comma list of cola,sst2,rotten_tomatoes")
    bench.add_argument("--components", help="comma list of query,...,ffn_out,layer,full")
    bench.add_argument("--layers", help="e.g. 0-5, 0,2 or all")
    bench.add_argument("--attacks", help="comma list, e.g. gradmatch,span,auto")
    bench.add_argument("--batch-sizes", help="comma list, e.g. 1,4,8")
    bench.add_argument("--sentences", type=int, help="sentences per cell")
    add_budget_argument(bench)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", default="auto")
    bench.add_argument("--out", type=Path, default=Path("bench-out"))
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=cmd_bench)

    dp = sub.add_parser(
        "dpsweep", help="leakage of the DP-SGD released gradient against σ and ε (+ utility)"
    )
    dp.add_argument("--model", default="minilm")
    dp.add_argument("--data", required=True, help="TSV/CSV/JSONL path or glue/sst2, ...")
    dp.add_argument("--modules", nargs="+", required=True, help="module specs, e.g. query@0")
    dp.add_argument("--sigmas", default="0,0.01,0.1,0.5,1", help="noise multipliers σ")
    dp.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C")
    dp.add_argument("--sample-rate", type=float, default=0.01, help="Poisson sampling rate q")
    dp.add_argument("--steps", type=int, default=1000, help="DP-SGD steps T behind ε")
    dp.add_argument("--delta", type=float, default=None, help="δ (default 1/N)")
    dp.add_argument("--accountant", default="rdp", choices=["rdp", "prv"])
    dp.add_argument("--attacks", default="auto,gradmatch", help="comma list of attacks")
    add_budget_argument(dp)
    dp.add_argument("--batch-size", type=int, default=1, help="sentences per attacked batch")
    dp.add_argument("--batches", type=int, default=2, help="attacked batches per σ")
    dp.add_argument(
        "--clip-scope",
        default="model",
        choices=["model", "modules"],
        help="clip each example over all trainable parameters (DP-SGD) or the modules only",
    )
    dp.add_argument("--utility", type=int, default=0, metavar="K", help="DP fine-tuning steps")
    dp.add_argument("--utility-lr", type=float, default=5e-4)
    dp.add_argument("--eval-size", type=int, default=200, help="held-out examples for accuracy")
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--device", default="auto")
    dp.add_argument("--out", type=Path, default=Path("dpsweep-out"))
    dp.add_argument("--redact", action="store_true", help="keep scores only, no text")
    dp.add_argument("--quiet", action="store_true")
    dp.set_defaults(func=cmd_dpsweep)

    report = sub.add_parser(
        "report", help="re-render report.md and report.html of an audit directory from report.json"
    )
    report.add_argument("dir", type=Path, help="audit directory holding report.json")
    report.add_argument(
        "--redact",
        action="store_true",
        help="remove all text, in report.json too (cannot be undone): scores and counts only",
    )
    report.add_argument("--open", action="store_true", help="print the path of report.html")
    report.set_defaults(func=cmd_report)

    # Commands that need a training framework live in gradaudit.integrations and register
    # through this entry-point group, so the core never imports them by name.
    for entry in importlib.metadata.entry_points(group="gradaudit.commands"):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GradAuditError as error:
        print(f"gradaudit: error: {error}", file=sys.stderr)
        return 2
