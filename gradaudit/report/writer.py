"""Writes a report's three files atomically, mode 0600, in a private directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradaudit.io import atomic_write_json, atomic_write_text, private_dir
from gradaudit.report.html import render_html
from gradaudit.report.markdown import render_markdown


def write_report(directory: str | Path, report: dict[str, Any]) -> Path:
    """Write `report.json`, `report.md` and `report.html` atomically (0600, directory 0700)."""
    directory = private_dir(directory)
    atomic_write_json(directory / "report.json", report)
    atomic_write_text(directory / "report.md", render_markdown(report))
    atomic_write_text(directory / "report.html", render_html(report))
    return directory / "report.json"
