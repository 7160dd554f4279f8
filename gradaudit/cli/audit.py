"""`gradaudit audit`: attack batches of a data set and write a report."""

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
    progress_disabled,
)


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("audit", help="attack batches of a data set and write a report")
    add_model_argument(parser)
    add_adapter_argument(parser)
    parser.add_argument("--data", required=True, help="TSV/CSV/JSONL path or glue/sst2, ...")
    parser.add_argument("--modules", nargs="+", required=True, help="module specs, e.g. query@0")
    parser.add_argument("--batch-size", type=int, default=1, help="sentences per attacked batch")
    parser.add_argument("--limit", type=int, default=None, help="number of batches")
    parser.add_argument(
        "--train-mode",
        action="store_true",
        help="take the gradient in training mode, dropout on, as fine-tuning does",
    )
    parser.add_argument(
        "--fail-above",
        action="append",
        default=[],
        type=_threshold,
        metavar="METRIC=VALUE",
        help="exit with code 1 when any audit's METRIC (rouge1, rouge2, token_recall, exact, "
        "batch_rouge1) exceeds VALUE, e.g. rouge1=0.5; repeatable, for CI pipelines",
    )
    add_attack_arguments(parser)
    parser.set_defaults(func=run)


def _threshold(text: str) -> tuple[str, float]:
    from gradaudit.report.assertions import METRICS

    metric, sep, value = text.partition("=")
    try:
        if sep and metric in METRICS and 0 <= float(value) <= 1:
            return metric, float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"{text!r} is not METRIC=VALUE with METRIC one of {', '.join(METRICS)} and VALUE in "
        "[0, 1], e.g. rouge1=0.5"
    )


def run(args: argparse.Namespace) -> int:
    from gradaudit.attacks import get_attack
    from gradaudit.experiments.data import load_examples
    from gradaudit.model.batch import labels_for
    from gradaudit.model.loading import load_model
    from gradaudit.model.selection import select_modules
    from gradaudit.report import build_report, write_report
    from gradaudit.scoring.audit import audit_batch

    options = parse_options(args.option)
    get_attack(args.attack, **options)  # a bad attack, option or module fails before any work
    batches = load_examples(args.data).batches(args.batch_size, args.limit)
    model, tokenizer = load_model(args.model, adapter=args.adapter)
    modules = select_modules(model, args.modules)
    results = []
    for i, (texts, labels) in enumerate(
        tqdm(batches, desc="audit", disable=progress_disabled(args))
    ):
        result = audit_batch(
            model,
            tokenizer,
            texts,
            labels_for(model, labels),  # a causal LM's text is its own label
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
            print_result(result, show_text=args.show_text and not args.redact)
    config = {"command": "audit", **{k: v for k, v in vars(args).items() if k != "func"}}
    config["out"] = str(args.out.resolve())
    if Path(args.data).is_file():  # a local file (not a hub name): where it really is
        config["data"] = str(Path(args.data).resolve())
    report = build_report(results, config=config, redact=args.redact)
    print_report(report, write_report(args.out, report))
    return _check_thresholds(results, dict(args.fail_above))


def _check_thresholds(results: list, limits: dict[str, float]) -> int:
    """1 (with the reason on stderr) when a score exceeds its `--fail-above` limit, else 0."""
    from gradaudit.report.assertions import assert_no_leakage

    if not limits:
        return 0
    try:
        assert_no_leakage(
            results, **{"max_exact": None, **{f"max_{m}": v for m, v in limits.items()}}
        )
    except AssertionError as failure:
        print(f"gradaudit: {failure}", file=sys.stderr)
        return 1
    return 0
