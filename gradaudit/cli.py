"""The `gradaudit` command line: audit, attack (more commands register themselves below)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .errors import GradAuditError


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


def print_result(result, out=sys.stdout) -> None:
    """Per-sentence reconstructions with their ROUGE, then the batch scores."""
    for s in result.sentences:
        print(f"  R1 {s['rouge1']:.2f} R2 {s['rouge2']:.2f}", file=out)
        print(f"    reference:      {result.references[s['reference']]}", file=out)
        print(f"    reconstruction: {result.reconstructions[s['reconstruction']]}", file=out)
    print(
        f"  batch: ROUGE-1 {result.rouge1:.3f} ROUGE-2 {result.rouge2:.3f} "
        f"token recall {result.token_recall:.3f} in {result.seconds:.1f} s",
        file=out,
    )


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit_batch
    from .data import load_examples
    from .models import load_model
    from .report import build_report, write_report

    options = parse_options(args.option)
    model, tokenizer = load_model(args.model)
    batches = load_examples(args.data).batches(args.batch_size, args.limit)
    results = []
    for i, (texts, labels) in enumerate(tqdm(batches, desc="audit", disable=args.quiet)):
        result = audit_batch(
            model,
            tokenizer,
            texts,
            labels,
            args.modules,
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
    path = write_report(args.out, build_report(results, config=config, redact=args.redact))
    print(f"report: {path} and {path.with_suffix('.md')}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from .audit import audit_snapshot
    from .models import load_model
    from .report import build_report, write_report
    from .snapshot import GradientSnapshot

    options = parse_options(args.option)
    model, tokenizer = load_model(args.model)
    root = Path(args.snapshots)
    dirs = (
        [root]
        if (root / "snapshot.json").is_file()
        else sorted(p.parent for p in root.glob("*/snapshot.json"))
    )
    if not dirs:
        raise GradAuditError(f"{root} holds no snapshot (no snapshot.json in it or its subfolders)")
    results = []
    for i, directory in enumerate(tqdm(dirs, desc="attack", disable=args.quiet)):
        snapshot = GradientSnapshot.load(directory, model)
        result = audit_snapshot(
            model,
            tokenizer,
            snapshot,
            args.attack,
            seed=args.seed + i,
            device=args.device,
            budget=args.budget,
            **options,
        )
        results.append(result)
        if not args.quiet:
            tqdm.write(f"{directory}:")
            print_result(result)
    config = {
        "command": "attack",
        "model": args.model,
        "snapshots": str(root),
        "attack": args.attack,
        "options": options,
        "budget": args.budget,
        "seed": args.seed,
    }
    path = write_report(args.out, build_report(results, config=config, redact=args.redact))
    print(f"report: {path} and {path.with_suffix('.md')}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GradAuditError as error:
        print(f"gradaudit: error: {error}", file=sys.stderr)
        return 2
