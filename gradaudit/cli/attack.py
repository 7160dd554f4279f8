"""`gradaudit attack`: attack saved snapshots (sharded over ranks under torchrun)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from gradaudit.cli.common import (
    add_adapter_argument,
    add_attack_arguments,
    add_model_argument,
    parse_options,
    print_report,
    print_result,
)


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("attack", help="attack saved gradient snapshots")
    parser.add_argument("snapshots", help="a snapshot directory or a folder of them")
    add_model_argument(parser)
    add_adapter_argument(parser)
    add_attack_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Exit 1 when a snapshot could not be attacked (the report lists it with its error).

    With RANK and WORLD_SIZE set, each rank attacks its share; rank 0 writes the report.
    """
    from gradaudit.model.loading import load_model
    from gradaudit.report import build_report, write_report
    from gradaudit.scoring.audit import Shard, audit_snapshots, find_snapshots

    options = parse_options(args.option)
    root = Path(args.snapshots)
    directories = find_snapshots(root)
    shard = Shard.from_environment()
    model, tokenizer = load_model(args.model, adapter=args.adapter)

    def show(directory: Path, result) -> None:
        if not args.quiet and result.error is None:
            tqdm.write(f"{directory}:")
            print_result(result, show_text=args.show_text and not args.redact)

    results = audit_snapshots(
        model,
        tokenizer,
        directories,
        args.attack,
        seed=args.seed,
        device=args.device,
        budget=args.budget,
        shard=shard,
        progress=False if args.quiet else None,
        on_result=show,
        **options,
    )
    if results is None:  # another rank's share: rank 0 writes the report
        return 0
    config = {
        "command": "attack",
        "model": args.model,
        "snapshots": str(root),
        "attack": args.attack,
        "options": options,
        "budget": args.budget,
        "seed": args.seed,
        "world_size": shard.world,
    }
    report = build_report(results, config=config, redact=args.redact)
    print_report(report, write_report(args.out, report))
    failed = [r for r in results if r.error is not None]
    for result in failed:
        print(f"gradaudit: {result.info.get('snapshot', '')}: {result.error}", file=sys.stderr)
    return 1 if failed else 0
