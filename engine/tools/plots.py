"""Every PNG the engine writes, drawn with matplotlib (the Agg backend: no display needed).

One look for all of them: the "tab10" palette, light grid, a footer with the provenance lines
(device, commit, command) that every benchmark figure carries.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PALETTE = tuple(matplotlib.colormaps["tab10"].colors)   # RGB floats in [0, 1]
DPI = 100


def new_figure(panels: int = 1, width: float = 9.0, height: float = 4.5, footer: Sequence[str] = ()):
    """A figure of ``panels`` side-by-side axes with room for ``footer`` lines under them."""
    extra = 0.16 * len(footer) + (0.15 if footer else 0)
    fig, axes = plt.subplots(1, panels, figsize=(width, height + extra), dpi=DPI, squeeze=False)
    for ax in axes[0]:
        ax.grid(True, color="0.9")
        ax.set_axisbelow(True)
    if footer:
        fig.text(0.01, 0.01, "\n".join(footer), fontsize=7, family="monospace", va="bottom", color="0.25")
    fig.ijepa_footer = extra / (height + extra)
    return fig, list(axes[0])


def save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout(rect=(0, getattr(fig, "ijepa_footer", 0.0), 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def save_line_plot(path: str, series: Mapping[str, Tuple[Sequence[float], Sequence[float]]], title: str = "",
                   xlabel: str = "", ylabel: str = "", logy: bool = False, size: Tuple[int, int] = (900, 560)) -> str:
    """Line plot of ``{name: (xs, ys)}``. Non-finite points (and non-positive ones with ``logy``) are
    left out. Returns ``path``."""
    fig, (ax,) = new_figure(width=size[0] / DPI, height=size[1] / DPI)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        x, y = np.asarray(xs, dtype=np.float64).ravel(), np.asarray(ys, dtype=np.float64).ravel()
        if x.shape != y.shape:
            raise ValueError(f"series {name!r}: {x.size} x values but {y.size} y values")
        ok = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
        if ok.any():
            ax.plot(x[ok], y[ok], label=name, color=PALETTE[i % len(PALETTE)], linewidth=1.6)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if len(series) > 1:
        ax.legend()
    return save(fig, path)


def save_table_png(path: str, rows: Sequence[Sequence], title: str = "", header: bool = True) -> str:
    """A table; the first row is the header when ``header``. Returns ``path``."""
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    if not rows:
        raise ValueError("save_table_png: no rows")
    ncol = max(len(r) for r in rows)
    rows = [r + [""] * (ncol - len(r)) for r in rows]
    width = max(4.0, 0.11 * sum(max(len(r[j]) for r in rows) + 3 for j in range(ncol)))
    fig, ax = plt.subplots(figsize=(width, 0.6 + 0.32 * len(rows)), dpi=DPI)
    ax.axis("off")
    body = rows[1:] if header else rows
    table = ax.table(cellText=body or [[""] * ncol], colLabels=rows[0] if header else None, loc="center",
                     cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1, 1.4)
    if title:
        ax.set_title(title)
    return save(fig, path)
