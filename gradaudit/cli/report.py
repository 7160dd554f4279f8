"""`gradaudit report`: re-render an audit directory's report, or redact it."""

from __future__ import annotations

import argparse
from pathlib import Path

from gradaudit.cli.common import print_report_paths


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="re-render report.md and report.html of an audit directory from report.json"
    )
    parser.add_argument("dir", type=Path, help="audit directory holding report.json")
    parser.add_argument(
        "--redact",
        action="store_true",
        help="remove all text, in report.json too (cannot be undone): scores and counts only",
    )
    parser.add_argument("--open", action="store_true", help="print the path of report.html")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
