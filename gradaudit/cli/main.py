"""The `gradaudit` command line: each command module adds its own subparser.

Commands that need a training framework (e.g. `demo`) live in `gradaudit.integrations` and
register through the `gradaudit.commands` entry-point group, so the core never names them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence
from typing import Any

from gradaudit._version import __version__
from gradaudit.cli import attack, audit, bench, dpsweep, report, scan
from gradaudit.errors import GradAuditError

COMMANDS = (audit, attack, scan, bench, dpsweep, report)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each flag's text with its default, where it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, [], argparse.SUPPRESS) or action.default is False:
            return text
        if "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: its help shows every flag's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every built-in command and every `gradaudit.commands` entry point."""
    parser = argparse.ArgumentParser(
        prog="gradaudit", description="Audit training-text leakage from partial gradients."
    )
    parser.add_argument("--version", action="version", version=f"gradaudit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
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
