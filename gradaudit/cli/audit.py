"""`gradaudit audit`: attack batches of a data set and write a report."""

from __future__ import annotations

import argparse

from tqdm.auto import tqdm

from gradaudit.cli.common import (
    add_attack_arguments,
    parse_options,
    print_report_paths,
    print_result,
)


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("audit", help="attack batches of a data set and write a report")
    parser.add_argument("--model", required=True, help="minilm, a local folder or a hub name")
    parser.add_argument("--data", required=True, help="TSV/CSV/JSONL path or glue/sst2, ...")
    parser.add_argument("--modules", nargs="+", required=True, help="module specs, e.g. query@0")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="number of batches")
    parser.add_argument(
        "--train-mode",
        action="store_true",
        help="take the gradient in training mode, dropout on, as fine-tuning does",
    )
    add_attack_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
            train_mode=args.train_mode,
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
