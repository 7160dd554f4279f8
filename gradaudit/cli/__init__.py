"""The command line: `main` collects one `add_command(subparsers)` per command module."""

from gradaudit.cli.main import main

__all__ = ["main"]
