"""Raw text of each fixed-mix segment, for Hugging Face datasets and litgpt users.

Reads RUN/ingest/documents/part-*.parquet and the schedule's order.parquet; writes
RUN/export/<schedule>/text/<NNN_segment>.parquet (zstd) or .jsonl, one row per scheduled
document in stream order: position, id, source, quadrant, stage (name), epoch, text. Segments
are the plan's (pure stages and transition slices); files.json lists them with their mix.
The join runs in DuckDB, ordered by position and spilling to disk, so the corpus need not fit
in memory; rows are written in fixed-size row groups so a resumed export is byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.export.config import ExportConfig
from framelm.export.plan import ExportPlan, Segment
from framelm.ingest import DOCUMENT_GLOB
from framelm.rundir import RunDir
from framelm.sql import connect

SCHEMA = pa.schema([("position", pa.int64()), ("id", pa.string()), ("source", pa.string()),
                    ("quadrant", pa.string()), ("stage", pa.string()), ("epoch", pa.int32()), ("text", pa.string())])
ROWS_PER_GROUP = 4096
FETCH_ROWS = 8192


def write_text(plan: ExportPlan, cfg: ExportConfig, run: RunDir, out_dir: Path) -> dict[str, Any]:
    docs_dir = run.path("ingest", "documents")
    if not any(docs_dir.glob(DOCUMENT_GLOB)):
        raise FramelmError(f"no Parquet files in {docs_dir}; run framelm ingest --run-dir {run.root} first")
    suffix = ".parquet" if cfg.text_format == "parquet" else ".jsonl"
    todo = [seg for seg in plan.segments if not fsutil.is_done(out_dir / (seg.folder + suffix))]
    if todo:
        _write_segments(plan, cfg, docs_dir, out_dir, todo, suffix)
    fsutil.write_json(out_dir / "files.json", {"format": cfg.text_format, "files": [
        {**seg.to_dict(), "file": seg.folder + suffix} for seg in plan.segments]})
    return {"files": len(plan.segments), "files_written": len(todo)}


def _write_segments(plan: ExportPlan, cfg: ExportConfig, docs_dir: Path, out_dir: Path,
                    todo: list[Segment], suffix: str) -> None:
    order_path = plan.order_path
    names = np.array([s.name for s in plan.stages], dtype=object)
    # Only positions of unfinished segments are read: a killed export resumes where it stopped.
    wanted = {seg.index for seg in todo}
    seg_of_doc_bounds = np.array([seg.end_doc for seg in plan.segments])
    spill = out_dir / f"duckdb{fsutil.TMP_TAG}spill"
    con = connect(cfg.duckdb_memory_limit, cfg.threads, spill)
    sink = _SegmentSink(out_dir, suffix)
    try:
        reader = con.sql(
            """SELECT o.position, o.id, o.source, o.quadrant, o.stage, o.epoch, d.text
               FROM read_parquet(?) o LEFT JOIN read_parquet(?) d ON o.id = d.id
               WHERE o.position >= ? ORDER BY o.position""",
            params=[str(order_path), str(docs_dir / DOCUMENT_GLOB), todo[0].first_doc]).to_arrow_reader(FETCH_ROWS)
        next_position = todo[0].first_doc
        for batch in reader:
            position = batch.column("position").to_numpy()
            missing = batch.column("text").is_null().to_numpy(zero_copy_only=False)
            if missing.any():
                k = int(np.flatnonzero(missing)[0])
                raise FramelmError(f"{order_path}: position {int(position[k])}: id {batch.column('id')[k].as_py()!r} "
                                   f"has no text in {docs_dir}")
            # The plan checked that positions run 0..n-1, so a repeat here is an id the join
            # matched twice: without this check its document would be written twice.
            repeated = np.flatnonzero(position != np.arange(next_position, next_position + len(position)))
            if len(repeated):
                k = int(repeated[0])
                raise FramelmError(f"{order_path}: position {int(position[k])}: id {batch.column('id')[k].as_py()!r} "
                                   f"is listed more than once in {docs_dir}")
            next_position += len(position)
            seg_index = np.searchsorted(seg_of_doc_bounds, position, side="right")
            stage = names[batch.column("stage").to_numpy()]
            table = pa.Table.from_batches([batch]).set_column(4, "stage", pa.array(stage, pa.string())).cast(SCHEMA)
            for idx in np.unique(seg_index):
                if int(idx) in wanted:
                    sink.write(plan.segments[int(idx)], table.filter(pa.array(seg_index == idx)))
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


class _SegmentSink:
    """Writes consecutive segments' rows into one atomic file each, in fixed-size row groups."""

    def __init__(self, out_dir: Path, suffix: str):
        self.out_dir, self.suffix = out_dir, suffix
        self.segment: Segment | None = None
        self._stack: contextlib.ExitStack | None = None
        self._pending: list[pa.Table] = []
        self._rows = 0

    def write(self, segment: Segment, table: pa.Table) -> None:
        if self.segment is None or segment.index != self.segment.index:
            self._close()
            self._open(segment)
        self._pending.append(table)
        self._rows += table.num_rows
        if self._rows >= ROWS_PER_GROUP:
            self._flush(final=False)

    def finish(self) -> None:
        self._close()

    def abort(self) -> None:
        """Called while an exception is handled: the open file's atomic_path drops its temp file."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(*sys.exc_info())

    def _open(self, segment: Segment) -> None:
        self.segment = segment
        self._stack = contextlib.ExitStack()
        self.path = self.out_dir / (segment.folder + self.suffix)
        tmp = self._stack.enter_context(fsutil.atomic_path(self.path))
        if self.suffix == ".parquet":
            self._writer = self._stack.enter_context(pq.ParquetWriter(tmp, SCHEMA, compression="zstd"))
        else:
            self._writer = self._stack.enter_context(open(tmp, "w", encoding="utf-8"))

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending) if self._pending else SCHEMA.empty_table()
        whole = table.num_rows if final else table.num_rows - table.num_rows % ROWS_PER_GROUP
        for a in range(0, whole, ROWS_PER_GROUP):
            part = table.slice(a, min(ROWS_PER_GROUP, whole - a))
            if self.suffix == ".parquet":
                self._writer.write_table(part, row_group_size=ROWS_PER_GROUP)
            else:
                self._writer.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in part.to_pylist())
        rest = table.slice(whole)
        self._pending, self._rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _close(self) -> None:
        if self._stack is None:
            return
        self._flush(final=True)
        stack, self._stack = self._stack, None
        stack.close()
        fsutil.mark_done(self.path)
