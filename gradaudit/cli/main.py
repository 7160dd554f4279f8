"""The `gradaudit` command line: each command module adds its own subparser.

Commands that need a training framework (e.g. `demo`) live in `gradaudit.integrations` and
register through the `gradaudit.commands` entry-point group, so the core never names them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from gradaudit.cli import attack, audit, bench, dpsweep, report, scan
from gradaudit.errors import GradAuditError

COMMANDS = (audit, attack, scan, bench, dpsweep, report)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every built-in command and every `gradaudit.commands` entry point."""
    parser = argparse.ArgumentParser(
        prog="gradaudit", description="Audit training-text leakage from partial gradients."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_command(sub)
    for entry in importlib.metadata.entry_points(group="gradaudit.commands"):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a `GradAuditError` is printed as one line (exit code 2)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GradAuditError as error:
        print(f"gradaudit: error: {error}", file=sys.stderr)
        return 2
