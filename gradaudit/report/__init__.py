"""The leakage report: its schema, its Markdown and HTML renderings, plots, and the writer.

`html` and `markdown` read a report dict through `schema` and `format` only.
"""

from gradaudit.report.html import render_html
from gradaudit.report.markdown import render_markdown
from gradaudit.report.schema import SCHEMA_VERSION, build_report, read_report, redact_report
from gradaudit.report.writer import write_report

__all__ = [
    "SCHEMA_VERSION",
    "build_report",
    "read_report",
    "redact_report",
    "render_html",
    "render_markdown",
    "write_report",
]
