"""Matplotlib figures rendered to PNG bytes (Agg backend: no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from gradaudit.io import atomic_write_bytes  # noqa: E402


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


Points = Sequence[tuple[float, float]]


def line_panels(
    panels: Mapping[str, Mapping[str, Points]],
    *,
    xlabel: str,
    ylim: tuple[float, float] | None = (0.0, 1.0),
    join: bool = True,
) -> bytes:
    """Side-by-side panels (title -> series label -> (x, y) points), one legend below them.

    x values are integers (steps or audit numbers); `ylim` widens a little so points on the
    bounds stay visible. `join=False` draws markers only, for points that are independent
    measurements (e.g. scores of different batches), where a line would suggest a trend.
    """
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False, sharey=ylim is not None
    )
    for ax, (title, series) in zip(axes[0], panels.items()):
        for k, (label, points) in enumerate(series.items()):
            xs, ys = zip(*sorted(points)) if points else ((), ())
            # Distinct markers and dashes keep coinciding series visible under each other.
            style = ("-", "--", ":", "-.")[k % 4] if join else "none"
            ax.plot(xs, ys, label=label, marker="osD^v<>p*h"[k % 10], markersize=7 - k % 3,
                    linestyle=style, alpha=0.85)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        xs_all = sorted({x for points in series.values() for x, _ in points})
        if len(xs_all) <= 12:
            ax.set_xticks(xs_all)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ylim is not None:
            ax.set_ylim(ylim[0] - 0.03, ylim[1] + 0.03)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(labels) > 1:
        rows = (len(labels) + 3) // 4
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False)
        fig.tight_layout(rect=(0, 0.07 * rows, 1, 1))
    return figure_png(fig)
