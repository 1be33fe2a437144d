"""The "Scores and quadrants" section: the PPL-PD density plot with its cut lines, and each
quadrant's tokens, medians and source mix, from RUN/score and RUN/partition."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from framelm import fsutil, plots
from framelm.errors import FramelmError
from framelm.labels import LABELS, SCORES, labelled_sql
from framelm.report.config import ReportConfig
from framelm.report.extremes import extremes_table
from framelm.report.page import Image, Section, fmt_number, not_run, html_table
from framelm.rundir import RunDir
from framelm.sql import parquet_columns

SCORE_COLUMNS = ("source", "n_tokens", "ppl", "pd")  # labelled_sql adds quadrant, ppl_bin and pd_bin
SAMPLE_DOCS = 1_000_000  # documents that fix the density plot's ranges and the quadrant medians


def _cell_order(cells: list[tuple[str, int, int]]) -> list[str]:
    """Cell names ordered by (ppl_bin, pd_bin): Q1, Q2, Q3, Q4 or P0D0, P0D1, ..."""
    return [name for name, *_ in sorted(set(cells), key=lambda c: (c[1], c[2], c[0]))]


def stated_lines(summary: Any, path: Path, source: str | None, x_lo: float, x_hi: float
                  ) -> tuple[list[float], list[tuple[float, float, float]]] | None:
    """Cut lines from summary.json's `cut_points` for one panel: all sources (source None) or one
    source, which uses its own cut points when the split was stratified by source, else the global ones.

    Each entry is {"axis": "ppl"|"pd", "source": name|None, "ppl_bin": int|None, "cuts": [...]};
    a PD entry with a ppl_bin (nested split) applies only inside that PPL bin. None when the
    summary states no cut points for the panel.
    """
    entries = summary.get("cut_points") if isinstance(summary, dict) else None
    if not isinstance(entries, list):
        return None
    for i, e in enumerate(entries):
        cuts = e.get("cuts") if isinstance(e, dict) else None
        if not (isinstance(cuts, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in cuts)):
            raise FramelmError(f"{path}: cut_points[{i}] must be an object whose 'cuts' is a list of numbers, got {e!r}")
    stated = {e.get("source") for e in entries}
    key = source if source in stated else None
    if source is not None and key is None and len(stated - {None}) > 0:
        return None  # stratified, but this source had no cut points of its own
    ppl = [e for e in entries if e.get("axis") == "ppl" and e.get("source") == key]
    pd = [e for e in entries if e.get("axis") == "pd" and e.get("source") == key]
    if len(ppl) != 1:
        return None
    ppl_cuts = sorted(float(x) for x in ppl[0]["cuts"])
    edges = [x_lo, *ppl_cuts, x_hi]
    segments = []
    for e in pd:
        b = e.get("ppl_bin")
        if b is not None and not (isinstance(b, int) and 0 <= b < len(edges) - 1):
            raise FramelmError(f"{path}: cut_points entry {e!r} has ppl_bin {b!r}; expected null or 0..{len(edges) - 2}")
        x0, x1 = (x_lo, x_hi) if b is None else (edges[b], edges[b + 1])
        segments += [(x0, x1, float(y)) for y in e["cuts"]]
    return ppl_cuts, segments


def lines_from_data(ranges: list[tuple[int, int, float, float, float, float]], x_lo: float, x_hi: float
                     ) -> tuple[list[float], list[tuple[float, float, float]]] | None:
    """Cut lines implied by the bins themselves: between the largest value of one bin and the
    smallest of the next. None when bins overlap (cut points that differ per source)."""
    by_ppl: dict[int, list[float]] = {}
    by_cell: dict[int, dict[int, list[float]]] = {}
    for ppl_bin, pd_bin, ppl_min, ppl_max, pd_min, pd_max in ranges:
        lo_hi = by_ppl.setdefault(ppl_bin, [math.inf, -math.inf])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], ppl_min), max(lo_hi[1], ppl_max)
        by_cell.setdefault(ppl_bin, {})[pd_bin] = [pd_min, pd_max]
    ppl_bins = sorted(by_ppl)
    ppl_cuts = []
    for a, b in zip(ppl_bins, ppl_bins[1:]):
        if by_ppl[a][1] > by_ppl[b][0]:
            return None
        ppl_cuts.append(math.sqrt(by_ppl[a][1] * by_ppl[b][0]))  # midpoint on the log axis
    edges = [x_lo, *ppl_cuts, x_hi]
    segments = []
    for i, a in enumerate(ppl_bins):
        cells = by_cell[a]
        pd_bins = sorted(cells)
        for p, q in zip(pd_bins, pd_bins[1:]):
            if cells[p][1] > cells[q][0]:
                return None
            segments.append((edges[i], edges[i + 1], (cells[p][1] + cells[q][0]) / 2))
    return ppl_cuts, segments


def _quadrant_composition(cfg: ReportConfig, con: Any, sample: dict[str, np.ndarray], every: int, out: Path,
                          section: Section) -> None:
    """Tokens, documents, medians and source mix of each quadrant: the bars and the table.

    Counts come from the `binned` table; they cover the scheduled (train) documents when the
    split column says which. Medians come from the sample of every `every`-th document.
    """
    n_train = con.execute("SELECT count(*) FROM binned WHERE train").fetchone()[0]
    scope_sql = "train" if n_train else "true"
    scope = "the training documents only (split = train)" if n_train else "all labelled documents"
    in_scope = sample["train"] if n_train else np.ones(len(sample["pd"]), dtype=bool)
    medians = {}
    for q in np.unique(sample["quadrant"]):
        rows = in_scope & (sample["quadrant"] == q)
        medians[q] = (float(np.median(np.exp(sample["log_ppl"][rows]))), float(np.median(sample["pd"][rows]))) \
            if rows.any() else (None, None)
    cell_rows = con.execute(f"SELECT quadrant, min(ppl_bin), min(pd_bin), sum(docs), sum(tokens) FROM binned "
                            f"WHERE {scope_sql} GROUP BY quadrant").fetchall()
    mix_rows = con.execute(f"SELECT quadrant, source, sum(tokens) FROM binned WHERE {scope_sql} GROUP BY ALL").fetchall()
    cells = _cell_order([(q, pb, db) for q, pb, db, *_ in cell_rows])
    sources = sorted({s for _, s, _ in mix_rows})
    tokens = np.zeros((len(cells), len(sources)))
    for q, s, t in mix_rows:
        tokens[cells.index(q), sources.index(s)] = t
    plots.quadrant_bars(out / "quadrants.png", cells, sources, tokens, cfg.dpi)
    section.images.append(Image(
        "quadrants.png",
        f"Left: tokens in each quadrant, stacked by source, labelled with the quadrant's share of all tokens; right: "
        f"the same as shares, so a bar dominated by one colour is a quadrant that is mostly one source. Counts cover {scope}."))

    total_tokens = sum(r[4] for r in cell_rows) or 1
    info = {q: r for q, *r in cell_rows}
    body = []
    for i, q in enumerate(cells):
        _, _, docs, toks = info[q]
        ppl_med, pd_med = medians.get(q, (None, None))
        mix = sorted(zip(sources, tokens[i]), key=lambda st: -st[1])
        mix_text = ", ".join(f"{html.escape(s)} {t / max(toks, 1):.0%}" for s, t in mix[:3] if t > 0)
        body.append([html.escape(q), f"{docs:,}", f"{toks:,}", f"{toks / total_tokens:.1%}",
                     fmt_number(ppl_med), fmt_number(pd_med, 3), mix_text])
    section.blocks.append(html_table(["quadrant", "docs", "tokens", "token share", "median PPL", "median PD",
                                  "largest sources (token share)"], body,
                                 f"Quadrant summary over {scope}"
                                 + (f"; medians over one document in every {every:,}." if every > 1 else ".")))


def partition_section(cfg: ReportConfig, run: RunDir, out: Path, con: Any) -> Section:
    title, anchor = "Scores and quadrants", "quadrants"
    if not run.path(LABELS).is_file():
        return not_run(title, anchor, "no partition/quadrants.parquet", f"framelm partition --run-dir {run.root}")
    path, labelled = run.path(SCORES), labelled_sql(run)
    columns = parquet_columns(con, path, SCORE_COLUMNS, "see docs/ARCHITECTURE.md")
    summary_path = run.path("partition", "summary.json")
    summary = (fsutil.read_json(summary_path, f"re-run: framelm partition --run-dir {run.root} --force")
               if summary_path.is_file() else None)
    is_train = "split = 'train'" if "split" in columns else "false"
    valid = "ppl > 0 AND isfinite(ppl) AND isfinite(pd)"
    # Pass 1, on every k-th row (all rows up to SAMPLE_DOCS): the axis ranges, clipped to the
    # 0.1-99.9 percentiles, and each quadrant's medians. Systematic by file row: deterministic.
    every = max(1, math.ceil(pq.ParquetFile(path).metadata.num_rows / SAMPLE_DOCS))
    sample = con.execute(
        f"SELECT ln(ppl) AS log_ppl, pd, quadrant, {is_train} AS train FROM {labelled} "
        f"WHERE {valid} AND file_row_number % {every} = 0").fetchnumpy()
    section = Section(title, anchor)
    if not len(sample["pd"]):
        section.missing = f"{html.escape(str(path))} has no document with a finite PPL and PD"
        return section
    q_lo, q_hi = (float(v) for v in np.percentile(sample["log_ppl"], [0.1, 99.9]))
    d_lo, d_hi = (float(v) for v in np.percentile(sample["pd"], [0.1, 99.9]))
    if q_hi - q_lo < 1e-9:
        q_lo, q_hi = q_lo - 0.5, q_hi + 0.5
    if d_hi - d_lo < 1e-9:
        d_lo, d_hi = d_lo - 0.05, d_hi + 0.05
    n_sampled = len(sample["pd"]) * every
    n = int(min(cfg.density_bins, max(10, math.sqrt(n_sampled) / 2)))  # sparse data gets coarser, readable cells
    # Pass 2: everything else is read from this small table of (source, cell, split, density bin) groups.
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE binned AS SELECT source, quadrant, ppl_bin, pd_bin, {is_train} AS train, "
        f"least(greatest(floor((ln(ppl) - {q_lo!r}) / {(q_hi - q_lo) / n!r}), 0), {n - 1})::INT AS ppl_cell, "
        f"least(greatest(floor((pd - {d_lo!r}) / {(d_hi - d_lo) / n!r}), 0), {n - 1})::INT AS pd_cell, "
        f"count(*) AS docs, sum(n_tokens) AS tokens FROM {labelled} WHERE {valid} GROUP BY ALL")
    hist = con.execute("SELECT source, ppl_cell, pd_cell, sum(docs) FROM binned GROUP BY ALL").fetchall()
    ppl_edges = np.exp(np.linspace(q_lo, q_hi, n + 1))
    pd_edges = np.linspace(d_lo, d_hi, n + 1)
    x_lo, x_hi = float(ppl_edges[0]), float(ppl_edges[-1])

    counts: dict[str, np.ndarray] = {}
    for source, i, j, c in hist:
        counts.setdefault(source, np.zeros((n, n), dtype=np.int64))[i, j] += c
    by_docs = sorted(counts, key=lambda s: -int(counts[s].sum()))
    # (panel title, sources in it, source whose cut points it shows: None for all sources)
    facets: list[tuple[str, list[str], str | None]] = [("all sources", by_docs, None)]
    if len(by_docs) > 1:
        facets += [(s, [s], s) for s in by_docs[: cfg.max_source_panels]]

    panels, unlined, derived = [], [], []
    ranges = None  # each bin's PPL and PD range, read only when summary.json lacks cut points
    for name, sources, key in facets:
        lines = stated_lines(summary, summary_path, key, x_lo, x_hi)
        if lines is None:
            derived.append(name)
            if ranges is None:
                ranges = con.execute(
                    f"SELECT source, ppl_bin, pd_bin, min(ppl), max(ppl), min(pd), max(pd) "
                    f"FROM {labelled} WHERE {valid} GROUP BY ALL").fetchall()
            merged: dict[tuple[int, int], list[float]] = {}
            for s, pb, db, pmin, pmax, dmin, dmax in ranges:
                if s in sources:
                    r = merged.setdefault((pb, db), [math.inf, -math.inf, math.inf, -math.inf])
                    r[:] = [min(r[0], pmin), max(r[1], pmax), min(r[2], dmin), max(r[3], dmax)]
            lines = lines_from_data([(pb, db, *r) for (pb, db), r in merged.items()], x_lo, x_hi)
        if lines is None:
            unlined.append(name)
            lines = ([], [])
        panels.append(plots.DensityPanel(name, sum(counts[s] for s in sources), *lines))
    plots.density(out / "scores.png", panels, ppl_edges, pd_edges, "PPL (log scale)", cfg.dpi)
    origin = ("summary.json's cut points" if not derived else
              "the boundaries between the quadrant bins" if len(derived) == len(facets) else
              f"summary.json's cut points; from the boundaries between the bins on {html.escape(', '.join(derived))}")
    caption = (f"Documents over perplexity (x, log scale) and perplexity difference PD (y); brighter cells hold more "
               f"documents, dashed red lines are the quadrant cuts ({origin}), left of a vertical line is low PPL "
               f"and below a horizontal line is low PD. Extremes are clipped to the 0.1-99.9 percentile range.")
    if unlined:
        caption += f" No lines on {html.escape(', '.join(unlined))}: the cut points differ per source there (stratified split)."
    section.images.append(Image("scores.png", caption))

    _quadrant_composition(cfg, con, sample, every, out, section)
    excluded = summary.get("excluded") if isinstance(summary, dict) else None
    if isinstance(excluded, dict) and excluded:
        text = ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in sorted(excluded.items()))
        section.blocks.append(f"<p>Documents excluded from the partition: {text}.</p>")
    if table := extremes_table(cfg, run, con):
        section.blocks.append(table)
    return section
