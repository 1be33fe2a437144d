"""The "Schedules" section: each schedule's quadrant or source shares along its tokens, from
RUN/schedule/<name>/order.parquet and stages.yaml."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from framelm import plots
from framelm.config import load_yaml
from framelm.errors import FramelmError
from framelm.report.config import ReportConfig
from framelm.report.page import Image, Section, not_run
from framelm.report.records import number_field
from framelm.rundir import RunDir
from framelm.sql import parquet_columns, sql_str

ORDER_COLUMNS = ("position", "stage", "source", "quadrant", "n_tokens")


def _stages_and_cells(path: Path, stage_tokens: list[int]) -> tuple[list[tuple[str, float]], list[str]]:
    """(name, start token) of each stage, and the cells a selection keeps (none: every cell): from
    stages.yaml, else the stages from the stage column of order.parquet (stage k starts after the
    tokens of stages < k). stages.yaml also lists a stage that got no documents, which
    order.parquet cannot show."""
    if not path.is_file():
        starts = np.concatenate([[0], np.cumsum(stage_tokens)[:-1]]).tolist()
        return [(f"stage {i}", float(t)) for i, t in enumerate(starts)], []
    data = load_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, list) or not all(isinstance(st, dict) for st in stages):
        raise FramelmError(f"{path}: expected a mapping with a 'stages' list of {{name, start_token, end_token, ...}}")
    return ([(str(st.get("name", f"stage {i}")), number_field(st, "start_token", f"{path}: stages[{i}]"))
             for i, st in enumerate(stages)], [str(c) for c in data.get("cells") or []])


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


def schedule_section(cfg: ReportConfig, run: RunDir, out: Path, con: Any) -> Section:
    title, anchor = "Schedules", "schedules"
    orders = sorted(run.root.glob("schedule/*/order.parquet"))
    if not orders:
        return not_run(title, anchor, "no schedule/*/order.parquet", f"framelm schedule --run-dir {run.root}")
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
        boundaries, kept = _stages_and_cells(path.parent / "stages.yaml", stage_tokens)
        file = f"schedule-{_slug(name)}.png"
        plots.schedule_areas(out / file, f"schedule '{name}' ({total:,} tokens)", total, centres, groups, shares,
                             boundaries, group, cfg.dpi)
        section.images.append(Image(
            file, f"Schedule '{html.escape(name)}': each band's height is that {group}'s share of the tokens trained on "
                  f"at that point of the run; dotted lines mark where each stage's token budget begins."
                  + (f" A selection: it keeps only the documents of cells {html.escape(', '.join(kept))}, repeated as "
                     f"the budget needs." if kept else "")))
    return section


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
