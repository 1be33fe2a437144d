"""The report's figures: plain arrays in, one PNG file out.

Every function here draws one figure from already-aggregated numbers (the report package does
the reading and aggregating) and writes it atomically to the given path. Figures are built
with `matplotlib.figure.Figure` and the Agg renderer directly, not pyplot, so no global state
or display backend is involved and figures are freed as soon as they are written.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from framelm import fsutil

PALETTE = [
    "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3",
    "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD",
]


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _save(fig: Figure, path: Path, dpi: int) -> None:
    FigureCanvasAgg(fig)
    with fsutil.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _tokens_label(ax, axis: str = "x") -> None:
    """Axis tick labels in K/M/B tokens."""
    def fmt(v: float, _pos: int) -> str:
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if abs(v) >= scale:
                return f"{v / scale:g}{unit}"
        return f"{v:g}"

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_formatter(FuncFormatter(fmt))


@dataclasses.dataclass
class DensityPanel:
    title: str
    counts: np.ndarray  # [n_ppl_bins, n_pd_bins] documents per cell
    ppl_cuts: list[float]  # vertical lines across the whole panel
    pd_segments: list[tuple[float, float, float]]  # (ppl_from, ppl_to, pd) horizontal segments


def density(path: Path, panels: Sequence[DensityPanel], ppl_edges: np.ndarray, pd_edges: np.ndarray,
            ppl_label: str, dpi: int) -> None:
    """2D histograms of documents over (PPL, PD), log PPL axis, with the cut lines drawn."""
    rows, cols = _grid(len(panels), 3)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    vmax = max(1, max(int(p.counts.max()) for p in panels))
    mesh = None
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        masked = np.ma.masked_equal(panel.counts.T, 0)  # pcolormesh wants [y, x]
        mesh = ax.pcolormesh(ppl_edges, pd_edges, masked, norm=LogNorm(vmin=1, vmax=vmax), cmap="viridis", shading="flat")
        for x in panel.ppl_cuts:
            ax.axvline(x, color="#d62728", lw=1.2, ls="--")
        for x0, x1, y in panel.pd_segments:
            ax.plot([x0, x1], [y, y], color="#d62728", lw=1.2, ls="--")
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis, ppl_edges[0], ppl_edges[-1])
        ax.set_xlim(ppl_edges[0], ppl_edges[-1])
        ax.set_ylim(pd_edges[0], pd_edges[-1])
        ax.set_title(f"{panel.title} ({int(panel.counts.sum()):,} docs)", fontsize=10)
        ax.set_xlabel(ppl_label)
        ax.set_ylabel("PD")
    fig.colorbar(mesh, ax=fig.axes, label="documents per cell", shrink=0.8)
    _save(fig, path, dpi)


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """Log-axis ticks as plain numbers (1,000,000, not 1e+06). Across a decade or two, matplotlib labels its minor
    ticks as 3x10^2, 4x10^2, ..., which overlap on a small panel; there ticks go at 1, 2 and 5
    of each decade instead, and wider spans keep one tick a decade."""
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def quadrant_bars(path: Path, cells: list[str], sources: list[str], tokens: np.ndarray, dpi: int) -> None:
    """Per cell: tokens stacked by source (left) and the same as shares of the cell (right).

    tokens: [n_cells, n_sources].
    """
    fig = Figure(figsize=(max(8.0, 1.1 * len(cells) * 2 + 3), 3.8), layout="constrained")
    ax_abs, ax_rel = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    x = np.arange(len(cells))
    totals = tokens.sum(axis=1)
    shares = tokens / np.where(totals > 0, totals, 1)[:, None]
    bottom_abs, bottom_rel = np.zeros(len(cells)), np.zeros(len(cells))
    for j, source in enumerate(sources):
        ax_abs.bar(x, tokens[:, j], bottom=bottom_abs, color=colour(j), label=source)
        ax_rel.bar(x, shares[:, j], bottom=bottom_rel, color=colour(j))
        bottom_abs += tokens[:, j]
        bottom_rel += shares[:, j]
    grand = totals.sum() or 1
    for xi, t in zip(x, totals):
        ax_abs.annotate(f"{t / grand:.0%}", (xi, t), ha="center", va="bottom", fontsize=9)
    for ax in (ax_abs, ax_rel):
        ax.set_xticks(x, cells)
        ax.set_xlabel("quadrant")
    ax_abs.set_ylabel("tokens")
    _tokens_label(ax_abs, "y")
    ax_abs.set_title("tokens per quadrant (label: share of all tokens)", fontsize=10)
    ax_rel.set_ylabel("share of the quadrant's tokens")
    ax_rel.set_ylim(0, 1)
    ax_rel.set_title("source mix", fontsize=10)
    fig.legend(*ax_abs.get_legend_handles_labels(), loc="outside right upper", title="source")
    _save(fig, path, dpi)


def schedule_areas(path: Path, title: str, total_tokens: int, token_centres: np.ndarray, groups: list[str], shares: np.ndarray,
                   boundaries: list[tuple[str, float]], group_label: str, dpi: int) -> None:
    """Stacked areas: share of each group (quadrant or source) in each token bin of a schedule.

    shares: [n_groups, n_bins], columns sum to 1; boundaries: (stage name, start token).
    """
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    # hold the first and last bins' shares out to the ends of the run, so the areas span [0, total]
    x = np.concatenate([[0], token_centres, [total_tokens]])
    y = np.column_stack([shares[:, :1], shares, shares[:, -1:]])
    ax.stackplot(x, y, labels=groups, colors=[colour(i) for i in range(len(groups))], alpha=0.9)
    for name, start in boundaries:
        ax.axvline(start, color="black", lw=1.0, ls=":")
        ax.annotate(name, (start, 1.0), xytext=(3, -3), textcoords="offset points", va="top", fontsize=8)
    ax.set_xlim(0, total_tokens)
    ax.set_ylim(0, 1)
    ax.set_xlabel("training tokens")
    _tokens_label(ax)
    ax.set_ylabel("share of tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title=group_label)
    _save(fig, path, dpi)


@dataclasses.dataclass
class Curve:
    label: str
    colour: str
    tokens: np.ndarray
    mean: np.ndarray
    band: np.ndarray | None  # half-width (one standard error across seeds); None with one seed
    boundaries: list[float]  # stage start tokens of this curve's schedule


def curves(path: Path, panels: Sequence[tuple[str, str, list[Curve]]], dpi: int, max_cols: int = 2) -> None:
    """Loss against tokens, one line per schedule, bands for seed spread, stage starts dotted.

    panels: (title, y label, curves).
    """
    rows, cols = _grid(len(panels), max_cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows), layout="constrained")
    for i, (title, ylabel, panel_curves) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for c in panel_curves:
            col = c.colour
            ax.plot(c.tokens, c.mean, color=col, lw=1.4, label=c.label, marker="o" if len(c.tokens) < 15 else None, ms=3)
            if c.band is not None:
                ax.fill_between(c.tokens, c.mean - c.band, c.mean + c.band, color=col, alpha=0.2, lw=0)
            for b in c.boundaries:
                ax.axvline(b, color=col, lw=0.9, ls=":", alpha=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens")
        _tokens_label(ax)
        ax.set_ylabel(ylabel)
        if i == 0:
            ax.legend(fontsize=8)
    _save(fig, path, dpi)


def accuracy_bars(path: Path, tasks: list[str], schedules: list[str], colours: list[str], mean: np.ndarray,
                  err: np.ndarray, metric: str, dpi: int) -> None:
    """Grouped bars: one group per task, one bar per schedule, error bars.

    mean, err: [n_tasks, n_schedules] (NaN where a schedule has no result for the task).
    """
    fig = Figure(figsize=(max(6.0, 0.9 * len(tasks) * max(1, len(schedules)) + 2), 3.8), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(schedules))
    x = np.arange(len(tasks))
    for k, schedule in enumerate(schedules):
        ax.bar(x + (k - (len(schedules) - 1) / 2) * width, mean[:, k], width, yerr=np.nan_to_num(err[:, k]),
               capsize=3, color=colours[k], label=schedule)
    ax.set_xticks(x, tasks, rotation=20 if len(tasks) > 4 else 0, ha="right" if len(tasks) > 4 else "center")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend(title="schedule", fontsize=8)
    _save(fig, path, dpi)
