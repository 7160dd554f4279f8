"""Arguments and printing shared by the commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gradaudit.errors import GradAuditError
from gradaudit.scoring.result import AuditResult


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


def add_list_argument(
    parser: argparse.ArgumentParser, flag: str, help: str, default: list[str] | None = None
) -> None:
    """A list flag, written as every list is on this command line: space-separated values
    (`--attacks span gradmatch`); comma-separated ones (`--attacks span,gradmatch`) work too."""
    parser.add_argument(
        flag, nargs="+", action=_ListAction, default=default, metavar="VALUE", help=help
    )


class _ListAction(argparse.Action):
    """Stores the values given, each split at commas."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = [part.strip() for value in values for part in value.split(",") if part.strip()]
        setattr(namespace, self.dest, items)


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    """`--attack-budget ATTACK=BUDGET`, repeatable."""
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


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--model`: required unless a default is given."""
    parser.add_argument(
        "--model",
        required=default is None,
        default=default,
        help="minilm (the packaged MiniLM), a local model folder or a hub name",
    )


def add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    """`--adapter`: a LoRA adapter folder put on `--model` (select its parts as
    `query@0:lora_A`)."""
    parser.add_argument(
        "--adapter",
        help="a LoRA adapter folder (PEFT save_pretrained) to put on the model; select its "
        "parts with specs such as query@0:lora_A",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """`--seed`, `--device` and `--quiet`, as every attacking command takes them."""
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' random draws")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars or per-sentence lines"
    )


def progress_disabled(args: argparse.Namespace) -> bool | None:
    """tqdm's `disable`: off with `--quiet`, else shown only on a terminal (None)."""
    return True if args.quiet else None


def add_attack_arguments(
    parser: argparse.ArgumentParser, default_attack: str = "gradmatch"
) -> None:
    """The attack, its options, budget, seed, device, output and redaction."""
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
    add_run_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory for the report")
    parser.add_argument("--redact", action="store_true", help="keep scores only, no text")
    parser.add_argument(
        "--show-text",
        action="store_true",
        help="print each reconstruction beside its training sentence (not with --redact)",
    )


def print_result(result: AuditResult, show_text: bool = False) -> None:
    """Per-sentence ROUGE (each reconstruction beside its reference with `show_text`: they
    are training text), then the batch scores; for an audit without scores, its error."""
    if result.error is not None:
        tqdm.write(f"  {result.error}")
        return
    for s in result.sentences:
        tqdm.write(f"  R1 {s['rouge1']:.2f} R2 {s['rouge2']:.2f}")
        if show_text:
            tqdm.write(f"    reference:      {result.references[s['reference']]}")
            tqdm.write(f"    reconstruction: {result.reconstructions[s['reconstruction']]}")
    tqdm.write(
        f"  batch: ROUGE-1 {result.rouge1:.3f} ROUGE-2 {result.rouge2:.3f} "
        f"token recall {result.token_recall:.3f} in {result.seconds:.1f} s"
    )


def print_report(report: dict[str, Any], path: Path) -> None:
    """The verdict, one line per module set, then where the report was written."""
    from gradaudit.report.verdict import verdicts

    for verdict in verdicts(report):
        print(verdict)
    print_report_paths(path)


def print_report_paths(path: Path) -> None:
    """Where the report was written."""
    print(f"report: {path.with_suffix('.html')} (also report.json, report.md)")
