"""Matplotlib figures rendered to PNG bytes (Agg backend: no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_write_bytes  # noqa: E402


def figure_png(fig: matplotlib.figure.Figure) -> bytes:
    """Render `fig` to PNG bytes and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def heatmap(
    matrix: Sequence[Sequence[float]], *, rows: Sequence[str], columns: Sequence[str], title: str
) -> bytes:
    """A [0, 1] heatmap with each value written in its cell (NaN cells left blank)."""
    fig, ax = plt.subplots(figsize=(1.1 * len(columns) + 2, 0.5 * len(rows) + 1.5))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                        color="black" if value > 0.6 else "white", fontsize=8)  # fmt: skip
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return figure_png(fig)


def heatmap_png(path: str | Path, matrix, *, rows, columns, title) -> Path:
    """Write `heatmap(...)` to `path` atomically."""
    return atomic_write_bytes(path, heatmap(matrix, rows=rows, columns=columns, title=title))
