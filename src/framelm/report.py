"""`framelm report`: one self-contained HTML page about a run, with figures and tables.

Reads (each optional; a section whose inputs are missing says "not run yet" and names the
command that makes them):
    RUN/score/scores.parquet, RUN/partition/quadrants.parquet,      scores, their quadrant labels,
    RUN/partition/summary.json                                      cut points
    RUN/schedule/<name>/order.parquet, stages.yaml                  each schedule's composition
    RUN/train/<name>/seed<k>/log.jsonl                              training and held-out loss
    RUN/export/<name>/stream/meta.json                              stage boundaries in tokens
    RUN/compare/results.json                                        accuracies and the compare table
Writes:
    RUN/report/index.html        the page; images referenced by relative path, no scripts,
                                 no external CSS or fonts, so the folder can be copied anywhere
    RUN/report/*.png             figures (matplotlib, Agg)

Large tables (100 M documents) are aggregated out of core by DuckDB into histograms before
anything is plotted; the page only ever holds binned numbers.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from framelm import fsutil, plots
from framelm.config import StageConfig, field, load_yaml
from framelm.errors import ConfigError, FramelmError
from framelm.partition import LABELS, SCORES, labelled_sql
from framelm.rundir import RunDir
from framelm.sql import connect, parquet_columns, sql_str

log = logging.getLogger("framelm")

# What the report reads, relative to the run directory; its fingerprint decides re-runs.
INPUT_PATTERNS = (
    "score/scores.parquet",
    "partition/quadrants.parquet",
    "partition/summary.json",
    "schedule/*/order.parquet",
    "schedule/*/stages.yaml",
    "train/*/seed*/log.jsonl",
    "export/*/stream/meta.json",
    "compare/results.json",
)
SCORE_COLUMNS = ("source", "n_tokens", "ppl", "pd")  # labelled_sql adds quadrant, ppl_bin and pd_bin
ORDER_COLUMNS = ("position", "stage", "source", "quadrant", "n_tokens")
# Below this many questions a task's accuracy has a sampling error above ~2 points, more than the
# differences between curricula of small proxy models (FRAME's gains are a few points).
FEW_QUESTIONS = 500
SAMPLE_DOCS = 1_000_000  # documents that fix the density plot's ranges and the quadrant medians


@dataclasses.dataclass
class ReportConfig(StageConfig):
    title: str = field("", help="page title; empty uses 'framelm report: <run directory name>'")
    verdict_metric: str = field("auto", help="compare-table metric the one-line verdicts are about; "
                                             "'auto' picks the overall held-out loss")
    significance_level: float = field(0.05, help="a difference counts as significant when the two-sided p-value "
                                                 "of its t test over seeds (compare's diff_p) is below this")
    accuracy_metric: Literal["acc", "acc_norm"] = field("acc", help="downstream metric plotted per task")
    schedule_groups: Literal["quadrant", "source"] = field("quadrant", help="what the schedule plots stack: "
                                                                           "quadrant or source shares")
    density_bins: int = field(80, help="most bins per axis of the PPL-PD density plot (fewer for small tables)")
    schedule_bins: int = field(200, help="most token bins along each schedule plot (fewer for short schedules: "
                                         "10 documents a bin on average)")
    train_loss_window: int = field(10, help="training-loss log entries in the centred rolling mean (1 = raw)")
    max_source_panels: int = field(8, help="largest sources (by documents) that get their own density panel")
    dpi: int = field(110, help="resolution of the PNG figures")
    memory_limit: str = field("2GB", help="DuckDB memory limit for aggregating large tables", hash=False)
    threads: int = field(2, help="DuckDB threads", hash=False)

    def validate(self) -> None:
        if not 0 < self.significance_level < 1:
            raise ConfigError(f"'significance_level' must lie strictly between 0 and 1, got {self.significance_level}")
        for key in ("density_bins", "schedule_bins"):
            if not 2 <= getattr(self, key) <= 2000:
                raise ConfigError(f"'{key}' must be between 2 and 2000, got {getattr(self, key)}")
        for key in ("train_loss_window", "dpi", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.max_source_panels < 0:
            raise ConfigError(f"'max_source_panels' must be >= 0, got {self.max_source_panels}")

    def input_fingerprint(self, run: RunDir) -> dict[str, Any]:
        """Size and mtime of every input file, and which results are out of date (its cautions):
        the report re-runs when any of them changes."""
        from framelm.pipeline import stale_records

        out: dict[str, Any] = {}
        for pattern in INPUT_PATTERNS:
            for p in sorted(run.root.glob(pattern)):
                st = p.stat()
                out[str(p.relative_to(run.root))] = [st.st_size, st.st_mtime_ns]
        if stale := stale_records(run, _finished_keys(run)):
            out["out_of_date"] = sorted(stale)
        return out


@dataclasses.dataclass
class Image:
    file: str  # a PNG in RUN/report/
    caption: str  # HTML: whoever builds it escapes the run's names in it


@dataclasses.dataclass
class Section:
    title: str
    anchor: str
    missing: str | None = None  # set when the inputs are absent: what to run first
    blocks: list[str] = dataclasses.field(default_factory=list)  # HTML fragments before the figures
    images: list[Image] = dataclasses.field(default_factory=list)


def _not_run(title: str, anchor: str, what: str, command: str) -> Section:
    return Section(title, anchor, missing=f"not run yet: {what} (run <code>{html.escape(command)}</code>)")


# -- reading files -------------------------------------------------------------------------

def _number(rec: dict[str, Any], key: str, where: str) -> float:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FramelmError(f"{where}: field '{key}' must be a number, got {value!r}")
    return float(value)


def _cell_order(cells: list[tuple[str, int, int]]) -> list[str]:
    """Cell names ordered by (ppl_bin, pd_bin): Q1, Q2, Q3, Q4 or P0D0, P0D1, ..."""
    return [name for name, *_ in sorted(set(cells), key=lambda c: (c[1], c[2], c[0]))]


# -- scores and quadrants ---------------------------------------------------------------

def _stated_lines(summary: Any, path: Path, source: str | None, x_lo: float, x_hi: float
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


def _lines_from_data(ranges: list[tuple[int, int, float, float, float, float]], x_lo: float, x_hi: float
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
                     _fmt(ppl_med), _fmt(pd_med, 3), mix_text])
    section.blocks.append(_table(["quadrant", "docs", "tokens", "token share", "median PPL", "median PD",
                                  "largest sources (token share)"], body,
                                 f"Quadrant summary over {scope}"
                                 + (f"; medians over one document in every {every:,}." if every > 1 else ".")))


def _partition_section(cfg: ReportConfig, run: RunDir, out: Path, con: Any) -> Section:
    title, anchor = "Scores and quadrants", "quadrants"
    if not run.path(LABELS).is_file():
        return _not_run(title, anchor, "no partition/quadrants.parquet", f"framelm partition --run-dir {run.root}")
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
        lines = _stated_lines(summary, summary_path, key, x_lo, x_hi)
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
            lines = _lines_from_data([(pb, db, *r) for (pb, db), r in merged.items()], x_lo, x_hi)
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
    return section


# -- schedules ----------------------------------------------------------------------------

def _stage_boundaries(path: Path, stage_tokens: list[int]) -> list[tuple[str, float]]:
    """(name, start token) of each stage: from stages.yaml, else from the stage column of
    order.parquet (stage k starts after the tokens of stages < k). stages.yaml also lists a
    stage that got no documents, which order.parquet cannot show."""
    if not path.is_file():
        starts = np.concatenate([[0], np.cumsum(stage_tokens)[:-1]]).tolist()
        return [(f"stage {i}", float(t)) for i, t in enumerate(starts)]
    stages = load_yaml(path).get("stages")
    if not isinstance(stages, list) or not all(isinstance(st, dict) for st in stages):
        raise FramelmError(f"{path}: expected a mapping with a 'stages' list of {{name, start_token, end_token, ...}}")
    return [(str(st.get("name", f"stage {i}")), _number(st, "start_token", f"{path}: stages[{i}]"))
            for i, st in enumerate(stages)]


def _tokens_by_bin(path: Path, group: str, n_bins: int, total_tokens: int) -> dict[str, np.ndarray]:
    """Stream tokens (each document's n_tokens and its EOS, as stages.yaml counts them) of each
    group (quadrant or source) in each of n_bins equal token ranges of a schedule, streaming
    order.parquet in row batches (it is written in position order)."""
    out: dict[str, np.ndarray] = {}
    done_tokens, last_position, row = 0, -1, 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["position", group, "n_tokens"], batch_size=1 << 20):
        position = batch.column("position").to_numpy()
        steps = np.diff(position, prepend=last_position)
        if np.any(steps <= 0):
            bad = row + int(np.argmax(steps <= 0))
            raise FramelmError(f"{path}: row {bad}: 'position' {position[bad - row]} does not increase; "
                               f"order.parquet must be sorted by position (re-run framelm schedule)")
        last_position, row = int(position[-1]), row + len(position)
        tokens = batch.column("n_tokens").to_numpy().astype(np.int64) + 1
        ends = done_tokens + np.cumsum(tokens)
        done_tokens = int(ends[-1])
        # a document counts in the bin holding its middle token
        bins = np.minimum((ends - tokens / 2) * n_bins // total_tokens, n_bins - 1).astype(np.int64)
        encoded = pc.dictionary_encode(batch.column(group))
        names = encoded.dictionary.to_pylist()
        per_group = np.bincount(encoded.indices.to_numpy() * n_bins + bins, weights=tokens,
                                minlength=len(names) * n_bins).reshape(len(names), n_bins)
        for name, counts in zip(names, per_group):
            out[name] = out.get(name, 0) + counts
    return out


def _schedule_section(cfg: ReportConfig, run: RunDir, out: Path, con: Any) -> Section:
    title, anchor = "Schedules", "schedules"
    orders = sorted(run.root.glob("schedule/*/order.parquet"))
    if not orders:
        return _not_run(title, anchor, "no schedule/*/order.parquet", f"framelm schedule --run-dir {run.root}")
    section = Section(title, anchor)
    group = cfg.schedule_groups
    binned = {}
    for path in orders:
        parquet_columns(con, path, ORDER_COLUMNS, "see docs/ARCHITECTURE.md")
        stage_rows = con.execute(f"SELECT stage, sum(n_tokens + 1), count(*) FROM read_parquet({sql_str(str(path))}) "
                                 f"GROUP BY stage ORDER BY stage").fetchall()
        total = int(sum(t for _, t, _ in stage_rows))
        if total <= 0:
            section.blocks.append(f"<p>Schedule <b>{html.escape(path.parent.name)}</b> is empty.</p>")
            continue
        n_bins = max(2, min(cfg.schedule_bins, sum(n for *_, n in stage_rows) // 10))  # 10 documents a bin on average
        binned[path] = (total, n_bins, [t for _, t, _ in stage_rows], _tokens_by_bin(path, group, n_bins, total))
    groups = sorted({g for *_, by_group in binned.values() for g in by_group})  # same colours in every plot
    for path, (total, n_bins, stage_tokens, by_group) in binned.items():
        name = path.parent.name
        grid = np.stack([by_group.get(g, np.zeros(n_bins)) for g in groups])
        filled = grid.sum(axis=0) > 0  # a document longer than a bin leaves the next bins empty
        shares = grid[:, filled] / grid[:, filled].sum(axis=0)
        centres = (np.arange(n_bins)[filled] + 0.5) * total / n_bins
        boundaries = _stage_boundaries(path.parent / "stages.yaml", stage_tokens)
        file = f"schedule-{_slug(name)}.png"
        plots.schedule_areas(out / file, f"schedule '{name}' ({total:,} tokens)", total, centres, groups, shares,
                             boundaries, group, cfg.dpi)
        section.images.append(Image(
            file, f"Schedule '{html.escape(name)}': each band's height is that {group}'s share of the tokens trained on "
                  f"at that point of the run; dotted lines mark where each stage's token budget begins."))
    return section


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


# -- loss curves --------------------------------------------------------------------------

def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 2:
        return values
    kernel = np.ones(min(window, len(values)))
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def _mean_over_seeds(series: list[dict[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean across seeds at each token count, and one standard error across seeds (None for one seed)."""
    tokens = np.array(sorted({t for s in series for t in s}))
    stack = np.full((len(series), len(tokens)), np.nan)
    index = {t: i for i, t in enumerate(tokens)}
    for k, s in enumerate(series):
        for t, v in s.items():
            stack[k, index[t]] = v
    n = np.sum(~np.isnan(stack), axis=0)
    mean = np.nansum(stack, axis=0) / n
    if len(series) == 1:
        return tokens, mean, None
    sq = np.nansum((stack - mean) ** 2, axis=0)
    band = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)) / np.sqrt(n), 0.0)
    return tokens, mean, band


def _read_log(path: Path) -> tuple[dict[float, float], dict[str, dict[float, float]]]:
    """Training loss and held-out losses by token count; a repeated step (resumed run) keeps the last value."""
    train: dict[float, float] = {}
    heldout: dict[str, dict[float, float]] = {}
    for line, rec in fsutil.read_log(path):
        where = f"{path}: line {line}"
        if rec.get("type") == "train":
            train[_number(rec, "tokens", where)] = _number(rec, "loss", where)
        elif rec.get("type") == "heldout":
            tokens = _number(rec, "tokens", where)
            losses = rec.get("losses")
            if not isinstance(losses, dict):
                raise FramelmError(f"{where}: field 'losses' must be an object of held-out set -> loss, got {losses!r}")
            for key in losses:
                heldout.setdefault(str(key), {})[tokens] = _number(losses, key, f"{where}, losses")
    return train, heldout


def _stage_starts(run: RunDir, schedule: str) -> list[float] | None:
    """Where the schedule's stages after the first begin, in stream tokens; None without an export."""
    path = run.path("export", schedule, "stream", "meta.json")
    if not path.is_file():
        return None
    stages = fsutil.read_json(path, f"re-run: framelm export --run-dir {run.root} --force").get("stages")
    if not isinstance(stages, list) or not all(isinstance(st, dict) for st in stages):
        raise FramelmError(f"{path}: field 'stages' must be a list of {{name, start_token, end_token}}")
    starts = [_number(st, "start_token", f"{path}: stages[{i}]") for i, st in enumerate(stages)]
    return [t for t in starts if t > 0]


def _compared_train_keys(compare: tuple[Path, dict[str, Any]] | None) -> list[str] | None:
    """The training runs compare/results.json lists (None without one): the loss plots show only
    these, so an ad-hoc `framelm train --seed 1` is not averaged into a schedule compare ran once."""
    if compare is None:
        return None
    runs = compare[1].get("runs")
    keys = [r.get("train_key") for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []
    return list(dict.fromkeys(k for k in keys if isinstance(k, str) and k.startswith("train/")))


def _loss_section(cfg: ReportConfig, run: RunDir, out: Path, palette: dict[str, str],
                  compare: tuple[Path, dict[str, Any]] | None = None) -> Section:
    title, anchor = "Loss curves", "loss"
    keys = _compared_train_keys(compare)
    if keys is None:
        logs = sorted(run.root.glob("train/*/seed*/log.jsonl"))
    else:
        logs = [p for p in (run.path(k, "log.jsonl") for k in keys) if p.is_file()]
    if not logs:
        what = "no train/*/seed*/log.jsonl" if keys is None else "no train/*/seed*/log.jsonl of the runs compare/results.json lists"
        return _not_run(title, anchor, what, f"framelm compare --run-dir {run.root}")
    shown_runs = ", ".join(str(p.parent.relative_to(run.root)) for p in logs)
    runs_text = (f" Runs shown: {shown_runs} ("
                 + ("those compare/results.json lists; other training runs in the run directory are left out)"
                    if keys is not None else "every train/*/seed*/log.jsonl found: there is no compare/results.json)"))
    per_schedule: dict[str, list[tuple[dict[float, float], dict[str, dict[float, float]]]]] = {}
    for path in logs:
        per_schedule.setdefault(path.parent.parent.name, []).append(_read_log(path))
    schedules = sorted(per_schedule)
    exported = {s: _stage_starts(run, s) for s in schedules}
    starts = {s: v or [] for s, v in exported.items()}
    seeds = {s: len(v) for s, v in per_schedule.items()}

    def curves(pick) -> list[plots.Curve]:
        out_curves = []
        for s in schedules:
            series = [d for d in (pick(r) for r in per_schedule[s]) if d]
            if series:
                tokens, mean, band = _mean_over_seeds(series)
                shown = [b for b in starts[s] if b <= tokens[-1]]  # stages the run has reached
                out_curves.append(plots.Curve(f"{s} ({seeds[s]} seed{'s' * (seeds[s] > 1)})", palette[s],
                                              tokens, mean, band, shown))
        return out_curves

    window = cfg.train_loss_window

    def smoothed(r):
        train = r[0]
        if not train:
            return {}
        t = np.array(sorted(train))
        return dict(zip(t, _rolling_mean(np.array([train[x] for x in t]), window)))

    panels = [("training loss" + (f" (rolling mean of {window} logs)" if window > 1 else ""), "loss (nats/token)",
               curves(smoothed))]
    if any("all" in r[1] for v in per_schedule.values() for r in v):
        panels.append(("held-out loss, all held-out documents", "loss (nats/token)", curves(lambda r: r[1].get("all"))))
    panels = [p for p in panels if p[2]]
    section = Section(title, anchor)
    if not panels:
        section.missing = "the training logs hold no 'train' or 'heldout' records yet"
        return section
    many_seeds = any(n > 1 for n in seeds.values())
    band = " Shaded bands are one standard error across seeds." if many_seeds else ""
    if any(starts.values()):
        marks = " Dotted vertical lines (in each schedule's colour) mark where its stages begin."
    elif any(v is not None for v in exported.values()):
        marks = " No stage boundaries to mark: each exported schedule shown has a single stage."
    else:
        marks = " Stage boundaries are not shown: no export/&lt;schedule&gt;/stream/meta.json found."
    plots.curves(out / "loss.png", panels, cfg.dpi)
    section.images.append(Image(
        "loss.png",
        "Loss against training tokens, one line per schedule (mean over seeds); lower is better, and the held-out "
        "panel is the fair comparison because every schedule is scored on the same documents. Its held-out sets are "
        "the training loop's (capped at train.heldout_max_tokens_per_set tokens each), not the eval stage's, so its "
        "last points need not equal the comparison table's held-out loss." + band + marks
        + html.escape(runs_text)))

    detail_keys = sorted({k for v in per_schedule.values() for r in v for k in r[1] if k != "all"})
    if detail_keys:
        detail = [(f"held-out loss, {k}", "loss (nats/token)", curves(lambda r, k=k: r[1].get(k))) for k in detail_keys]
        plots.curves(out / "heldout-sets.png", detail, cfg.dpi, max_cols=3)
        section.images.append(Image(
            "heldout-sets.png",
            "Held-out loss on each source and each quadrant separately, one line per schedule: a set whose loss "
            "falls while its stage trains and rises after it shows how much the order, not only the data, matters."
            + band + html.escape(runs_text)))
    return section


# -- downstream accuracy and the compare table ------------------------------------------------

def _compare_results(run: RunDir) -> tuple[Path, dict[str, Any]] | None:
    path = run.path("compare", "results.json")
    if not path.is_file():
        return None
    data = fsutil.read_json(path, f"re-run: framelm compare --run-dir {run.root} --force")
    for key in ("runs", "table"):
        if not isinstance(data.get(key, []), list):
            raise FramelmError(f"{path}: field '{key}' must be a list, got {type(data[key]).__name__}")
    return path, data


def _label(row: dict[str, Any]) -> str:
    """A compare run's or row's name, e.g. frame, or frame+ema for checkpoint-averaged weights (a
    file from before averaged weights were evaluated has no "weights")."""
    from framelm.compare import FINAL, label

    return label(str(row.get("schedule")), str(row.get("weights") or FINAL))


def _accuracy_section(cfg: ReportConfig, run: RunDir, out: Path, compare: tuple[Path, dict[str, Any]] | None,
                      palette: dict[str, str]) -> Section:
    title, anchor = "Downstream accuracy", "accuracy"
    if compare is None:
        return _not_run(title, anchor, "no compare/results.json", f"framelm compare --run-dir {run.root}")
    path, data = compare
    metric = cfg.accuracy_metric
    values: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    questions: dict[str, int] = {}  # per task, the fewest questions any run was scored on
    for r in data.get("runs", []):
        results = r.get("results") if isinstance(r, dict) else None
        tasks = results.get("tasks") if isinstance(results, dict) else None
        for task, m in (tasks if isinstance(tasks, dict) else {}).items():
            if isinstance(m, dict) and isinstance(m.get(metric), (int, float)):
                err = m.get(f"{metric}_stderr")
                values.setdefault((task, _label(r)), []).append(
                    (float(m[metric]), float(err) if isinstance(err, (int, float)) else None))
                if isinstance(m.get("n"), int):
                    questions[task] = min(questions.get(task, m["n"]), m["n"])
    section = Section(title, anchor)
    if not values:
        section.missing = f"not run yet: {html.escape(str(path))} has no downstream task results with '{metric}'"
        return section
    tasks = sorted({t for t, _ in values})
    schedules = [s for s in data.get("schedules", []) if any((t, s) in values for t in tasks)]
    schedules += sorted({s for _, s in values} - set(schedules))
    mean = np.full((len(tasks), len(schedules)), np.nan)
    err = np.full_like(mean, np.nan)
    for (task, schedule), v in values.items():
        i, k = tasks.index(task), schedules.index(schedule)
        accs = np.array([a for a, _ in v])
        mean[i, k] = accs.mean()
        if len(v) > 1:
            err[i, k] = accs.std(ddof=1) / math.sqrt(len(v))
        elif v[0][1] is not None:
            err[i, k] = v[0][1]
    n_seeds = max(len(v) for v in values.values())
    plots.accuracy_bars(out / "accuracy.png", tasks, schedules, [palette[s] for s in schedules], mean, err, metric,
                        cfg.dpi)
    what = ("one standard error across seeds" if n_seeds > 1
            else "the evaluation's own standard error (one seed: sampling of the task's questions only)")
    section.images.append(Image(
        "accuracy.png", f"Downstream {metric} per task (higher is better), one bar per schedule; error bars are {what}, "
                        f"so bars whose error bars overlap are not clearly different."
                        + (" Questions per task: " + ", ".join(f"{html.escape(t)} {questions[t]:,}" for t in tasks if t in questions)
                           + "." if questions else "")))
    few = [t for t in tasks if questions.get(t, FEW_QUESTIONS) < FEW_QUESTIONS]
    if few:
        section.blocks.append(_caution(
            "caution: " + ", ".join(f"{t} ({questions[t]:,} questions)" for t in few)
            + f" {'was' if len(few) == 1 else 'were'} scored on fewer than {FEW_QUESTIONS:,} questions; an accuracy near "
              f"50 % then has a sampling error of about ±{50 / math.sqrt(min(questions[t] for t in few)):.0f} points, "
              f"more than schedules usually differ by, so these bars cannot rank schedules"))
    return section


def _caution(note: str) -> str:
    """A caution line of compare's or the report's own ("caution: ...") as an HTML paragraph."""
    return f"<p class=\"caution\">{html.escape(note[0].upper() + note[1:])}.</p>"


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else "n/a"


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if _is_number(x) else "n/a"


def _lower_is_better(metric: str) -> bool:
    m = metric.lower()
    return any(k in m for k in ("loss", "bpb", "perplexity", "ppl", "heldout")) and "acc" not in m


def _is_overall_heldout_loss(metric: str) -> bool:
    """Whether a compare-table metric is the held-out loss over all held-out documents."""
    return "heldout" in metric and metric.endswith("/all") and "bpb" not in metric


def _pick_verdict_metric(cfg: ReportConfig, metrics: list[str], path: Path) -> str | None:
    if cfg.verdict_metric != "auto":
        if cfg.verdict_metric not in metrics:
            raise ConfigError(f"'verdict_metric' = {cfg.verdict_metric!r} is not a metric of {path}; "
                              f"choose one of: {', '.join(metrics)} (or 'auto')")
        return cfg.verdict_metric
    overall = [m for m in metrics if _is_overall_heldout_loss(m)]
    return next(iter(overall + [m for m in metrics if "loss" in m] + metrics), None)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def _significant(cfg: ReportConfig, row: dict[str, Any]) -> bool | None:
    """Whether a row's difference to random is significant; None where the table gives no p-value
    (the baseline, one seed, no spread, or a results.json from before compare wrote diff_p)."""
    p = row.get("diff_p")
    return p < cfg.significance_level if _is_number(p) else None


def _verdicts(cfg: ReportConfig, table: list[dict[str, Any]], metric: str) -> list[str]:
    lower = _lower_is_better(metric)
    label = "held-out loss" if _is_overall_heldout_loss(metric) else metric
    unit = " bits/byte" if "bpb" in metric else (" nats" if "loss" in metric else "")
    rows = [r for r in table if r.get("metric") == metric]
    seeds = {_label(r): r.get("n_seeds") for r in rows}
    out = []
    for row in rows:
        diff, se, p = row.get("diff_vs_random"), row.get("diff_stderr"), row.get("diff_p")
        if row.get("schedule") == "random" or not _is_number(diff):
            continue
        name, baseline = _label(row), _label({**row, "schedule": "random"})
        direction = "better" if (diff < 0) == lower else "worse"
        text = f"{name} vs {baseline}: {label} {diff:+.3f}"
        if not _is_number(se):
            text += f"{unit} (no standard error with {row.get('n_seeds', 1)} seed(s): no significance claim)"
        elif "diff_p" not in row:
            text += (f" ± {se:.3f}{unit} ({direction}; no p-value: this results.json predates compare's t test, "
                     f"re-run framelm compare to re-tabulate: no significance claim)")
        elif not _is_number(p):
            text += f" ± {se:.3f}{unit} ({direction}; no spread across seeds, no t test: no significance claim)"
        else:
            test = (f"paired t test over {row.get('n_seeds')} seeds" if row.get("diff_paired") else
                    f"Welch t test over {row.get('n_seeds')} and {seeds.get(baseline, 'n/a')} seeds")
            verdict = "significant" if _significant(cfg, row) else "not significant"
            text += f" ± {se:.3f}{unit} ({direction}, {verdict}: {_p_text(p)}, {test})"
        out.append(text)
    return out


def _compare_section(cfg: ReportConfig, run: RunDir, compare: tuple[Path, dict[str, Any]] | None) -> tuple[Section, list[str]]:
    title, anchor = "Comparison table", "compare"
    if compare is None:
        return _not_run(title, anchor, "no compare/results.json", f"framelm compare --run-dir {run.root}"), []
    path, data = compare
    table = [r for r in data.get("table", []) if isinstance(r, dict)]
    section = Section(title, anchor)
    if not table:
        section.missing = f"not run yet: {html.escape(str(path))} has an empty 'table'"
        return section, []
    metrics = list(dict.fromkeys(str(r.get("metric")) for r in table))
    metric = _pick_verdict_metric(cfg, metrics, path)
    verdicts = _verdicts(cfg, table, metric) if metric else []
    if not verdicts:
        verdicts = [f"no verdict: {path} has no difference against 'random' for {metric} "
                    f"(was 'random' among the compared schedules?)"]
    from framelm.compare import documents_note, heldout_notes, non_finite_note  # compare imports torch: only with a result

    for note in (non_finite_note(data), documents_note(data)):
        if note:
            section.blocks.append(_caution(note))
            verdicts.append(note)
    sizes = data.get("heldout_sets")
    if isinstance(sizes, dict) and sizes:
        rows = [[html.escape(str(name)), _count(size.get("docs")), _count(size.get("tokens"))]
                for name, size in sizes.items() if isinstance(size, dict)]
        section.blocks.append(_table(["held-out set", "documents", "tokens"], rows,
                                     "The held-out sets the held-out rows (and a held-out verdict) are measured on"))
    for line in heldout_notes(data, None):
        section.blocks.append(_caution(line))
    if metric:
        verdicts.extend(heldout_notes({**data, "quadrants_without_heldout": None}, metric))
    level = cfg.significance_level
    with_items = any(isinstance(r.get("item_stderr"), (int, float)) for r in table)
    body = []
    for r in table:
        mean, se, diff, dse = (r.get(x) for x in ("mean", "stderr", "diff_vs_random", "diff_stderr"))
        baseline = r.get("schedule") == "random"
        significant = _significant(cfg, r)
        row = [html.escape(str(r.get("metric"))), html.escape(_label(r)), f"{_fmt(mean)} ± {_fmt(se)}"]
        if with_items:
            row.append(_fmt(r.get("item_stderr")))
        row += [html.escape(str(r.get("n_seeds", "n/a"))),
                "" if baseline else f"{_fmt(diff)} ± {_fmt(dse)}",
                "" if baseline else _fmt(r.get("diff_p"), 2),
                "" if significant is None else "yes" if significant else "no"]
        body.append(row)
    header = ["metric", "schedule", "mean ± stderr (seeds)", *(["stderr (items)"] if with_items else []),
              "seeds", "difference vs random ± stderr", "p (t test)", f"significant (p < {level:g})"]
    section.blocks.append(_table(
        header, body, "Mean across seeds ± its standard error over seeds (n/a with one seed)"
                      + ("; stderr (items) is the evaluation's own sampling error over the task's questions" if with_items else "")
                      + "; differences are to random with the same weights (frame+ema against random+ema), paired by "
                        "seed where seeds match; p is the two-sided p-value of a t test over seeds (paired, else "
                        "Welch's), n/a where it has none (one seed, or no spread), so no significance claim there."))
    return section, verdicts


# -- the page --------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
nav a { margin-right: 1em; } .meta { color: #666; }
.verdict { background: #f5f7fa; border-left: 4px solid #4C72B0; padding: .6em 1em; }
.verdict li { font-family: ui-monospace, monospace; }
.missing, .caution { color: #8a6d3b; background: #fcf8e3; padding: .5em 1em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: .92em; margin-top: .3em; }
table { border-collapse: collapse; font-size: .9em; margin: 1em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, td:nth-child(2), th:first-child, th:nth-child(2) { text-align: left; }
caption { caption-side: top; text-align: left; color: #444; padding-bottom: .3em; }
"""


def _table(header: list[str], rows: list[list[str]], caption: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def stale_notes(run: RunDir) -> list[str]:
    """A caution per finished result that was made from an earlier result of a stage before it:
    the page would otherwise mix figures of different runs (a schedule of an old 3 x 2 grid
    beside the quadrants of the current 2 x 2) without a word."""
    from framelm.pipeline import stale_records

    return [f"out of date: {key} was made from an earlier result of {up} than the one now in the run, so its figures "
            f"and numbers do not belong with those of {up}; to make them agree, re-run {key} on the new {up} "
            f"(it was last made by: {run.command_for(key)}), or make {up} as it was (its new result was made by: "
            f"{run.command_for(up)})"
            for key, up in sorted(stale_records(run, _finished_keys(run)))]


def _finished_keys(run: RunDir) -> list[str]:
    return [k for k, rec in run.manifest()["stages"].items() if k != "report" and rec.get("status") == "done"]


def _render(title: str, run: RunDir, sections: list[Section], verdicts: list[str], stale: list[str]) -> str:
    from framelm import __version__

    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>",
             f"<style>{CSS}</style>\n</head>\n<body>", f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"meta\">Run directory <code>{html.escape(run.root.name)}</code>, framelm {html.escape(__version__)}.</p>",
             "<nav>" + "".join(f"<a href=\"#{s.anchor}\">{html.escape(s.title)}</a>" for s in sections) + "</nav>"]
    if verdicts:
        items = "".join(f"<li>{html.escape(v)}</li>" for v in verdicts)
        parts.append(f"<div class=\"verdict\"><b>Verdict</b><ul>{items}</ul></div>")
    parts.extend(_caution(note) for note in stale)
    pending = [s.title for s in sections if s.missing]
    if pending:
        parts.append(f"<p class=\"missing\">Sections not run yet: {html.escape(', '.join(pending))}.</p>")
    for s in sections:
        parts.append(f"<section id=\"{s.anchor}\">\n<h2>{html.escape(s.title)}</h2>")
        if s.missing:
            parts.append(f"<p class=\"missing\">{s.missing}</p>")
        parts.extend(s.blocks)
        for img in s.images:
            parts.append(f"<figure><img src=\"{html.escape(img.file)}\" alt=\"{html.escape(img.file)}\">"
                         f"<figcaption>{img.caption}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def build_report(cfg: ReportConfig, run: RunDir) -> dict[str, Any]:
    """Write RUN/report/index.html and its PNG figures from whatever the run holds so far."""
    out = run.stage_dir("report")
    for old in out.glob("*.png"):  # figures of sections that have since lost their inputs
        old.unlink()
    con = connect(cfg.memory_limit, cfg.threads)
    try:
        compare = _compare_results(run)
        comparison, verdicts = _compare_section(cfg, run, compare)
        # one colour per schedule on every figure that compares schedules
        names = {p.name for p in run.root.glob("train/*") if p.is_dir()}
        names |= {_label(r) for r in (compare[1].get("runs", []) if compare else []) if isinstance(r, dict)}
        palette = {name: plots.colour(i) for i, name in enumerate(sorted(names))}
        sections = [
            _partition_section(cfg, run, out, con),
            _schedule_section(cfg, run, out, con),
            _loss_section(cfg, run, out, palette, compare),
            _accuracy_section(cfg, run, out, compare, palette),
            comparison,
        ]
    finally:
        con.close()
    title = cfg.title or f"framelm report: {run.root.name}"
    page = out / "index.html"
    stale = stale_notes(run)
    fsutil.write_text(page, _render(title, run, sections, verdicts, stale))
    images = [img.file for s in sections for img in s.images]
    pending = [s.title for s in sections if s.missing]
    summary = f"report: {page} ({len(images)} figures" + (f"; not run yet: {', '.join(pending)})" if pending else ")")
    for line in (*verdicts, *stale):
        summary += "\n  " + line
    return {"figures": len(images), "sections": len(sections) - len(pending), "not_run_yet": len(pending), "out_of_date": len(stale),
            "summary": summary}
