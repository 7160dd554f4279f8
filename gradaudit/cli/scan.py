"""`gradaudit scan`: each module's gradient rank and leak label, without attacking."""

from __future__ import annotations

import argparse
from pathlib import Path

from gradaudit.cli.common import add_adapter_argument, add_model_argument


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("scan", help="no attack: gradient rank and leak label per module")
    add_model_argument(parser)
    add_adapter_argument(parser)
    parser.add_argument("--data", required=True, help="TSV/CSV/JSONL path or glue/sst2, ...")
    parser.add_argument(
        "--modules", nargs="+", default=["all@all"], help="module specs, e.g. query@0"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="sentences in the scanned batch")
    parser.add_argument("--out", type=Path, default=None, help="also write scan.json/scan.txt here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gradaudit.experiments.data import load_examples
    from gradaudit.experiments.scan import scan, to_json, to_table
    from gradaudit.io import atomic_write_text
    from gradaudit.model.batch import labels_for, make_batch
    from gradaudit.model.loading import load_model
    from gradaudit.model.selection import select_modules

    texts, labels = load_examples(args.data).batches(args.batch_size, 1)[0]
    model, tokenizer = load_model(args.model, adapter=args.adapter)
    batch = make_batch(model, tokenizer, texts, labels_for(model, labels))
    rows = scan(model, batch, select_modules(model, args.modules))
    print(to_table(rows))
    if args.out is not None:
        atomic_write_text(args.out / "scan.json", to_json(rows) + "\n")
        atomic_write_text(args.out / "scan.txt", to_table(rows) + "\n")
        print(f"wrote {args.out / 'scan.json'} and {args.out / 'scan.txt'}")
    return 0
