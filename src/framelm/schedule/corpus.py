"""The training documents: the labelled split == "train" rows of score/scores.parquet, read into
narrow arrays indexed by document (Corpus), their ids read in the background."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from framelm import fsutil
from framelm.columnar import Categories, in_background, index_dtype, row_groups
from framelm.errors import ConfigError, FramelmError
from framelm.labels import SCORES, read_labels
from framelm.rundir import RunDir

SUMMARY = "partition/summary.json"


@dataclass
class Corpus:
    """The training documents, as arrays indexed by document.

    The arrays are as narrow as their values allow (weight int32 unless a document has over
    2**31 tokens, cell and source int16 below 32768 values): the planner and the writer gather
    them at random, and at 100 M documents half the bytes is nearly half the time."""

    weight: np.ndarray  # tokens each document puts into the stream: n_tokens + its EOS
    cell: np.ndarray  # index into cell_names
    source: np.ndarray  # index into source_names
    cell_names: list[str]
    cell_bins: list[tuple[int, int]]  # (ppl_bin, pd_bin) of each cell
    source_names: list[str]
    rows: np.ndarray  # row of each document in `path` (or the table it was read from)
    ids: Any = None  # one Arrow string array of every row's id (document i's at rows[i]); or a Future of it
    path: Path | None = None  # scores.parquet, whose columns `sorted` reads

    def doc_ids(self, docs: np.ndarray | None = None) -> Any:
        """The ids of documents `docs` (default: all), in that order."""
        if isinstance(self.ids, Future):
            self.ids = self.ids.result()  # read in the background while the schedule was planned
        return self.ids.take(pa.array(self.rows if docs is None else self.rows[docs]))

    @cached_property
    def pair(self) -> np.ndarray:
        """One code per document for its (cell, source): cell * n_sources + source. The writer
        gathers this one array at random instead of two."""
        pair = self.cell.astype(code_dtype(len(self.cell_names) * len(self.source_names)))
        pair *= len(self.source_names)
        pair += self.source
        return pair

    def column(self, name: str) -> np.ndarray:
        """A numeric column of scores.parquet for every document."""
        import pyarrow.parquet as pq

        if name == "n_tokens":
            return (self.weight - 1).astype(float)
        if self.path is None:
            raise FramelmError(f"column {name!r} is not loaded")
        numeric = sorted(f.name for f in pq.read_schema(self.path) if pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        if name not in numeric:
            raise ConfigError(f"'column' = {name!r} is not a numeric column of {self.path}; choose one of {', '.join(numeric)}")
        values = pq.read_table(self.path, columns=[name]).column(name).to_numpy(zero_copy_only=False).astype(float)[self.rows]
        if not np.isfinite(values).all():
            raise FramelmError(f"{self.path}: column {name!r} is missing, NaN or infinite for some scheduled documents; sort by another column")
        return values

    @classmethod
    def from_table(cls, table: Any, cells: list[dict[str, Any]]) -> "Corpus":
        """From an in-memory table (columns id, source, quadrant, n_tokens; optional split) and
        the partition's cell list. Rows without a quadrant are not documents."""
        names = Categories(c["name"] for c in cells)
        codes = names.codes(table.column("quadrant")).astype(np.int16)
        if len(names.values) > len(cells):
            raise FramelmError(f"cell {names.values[len(cells)]!r} is not in the partition's cells {names.values[:len(cells)]}")
        corpus = cls.read([(table, codes)], table.num_rows, cells)
        corpus.ids = _one_chunk(table.column("id"))
        return corpus

    @classmethod
    def read(cls, pieces: Iterable[tuple[Any, np.ndarray]], n_rows: int, cells: list[dict[str, Any]],
             path: Path | None = None) -> "Corpus":
        """From (table, cell codes) pieces of n_rows rows in all: tables with columns source,
        n_tokens and optionally split, codes indexing `cells` (-1: no label). The documents
        are the rows with a label and split == "train"."""
        where = path or "the table"
        cell_names = [c["name"] for c in cells]
        sources, splits = Categories(), Categories()
        weight = np.empty(n_rows, np.int32)  # widened if a document has 2**31 tokens or more
        cell, source = np.empty(n_rows, code_dtype(len(cells))), np.empty(n_rows, np.int16)
        rows = np.empty(n_rows, index_dtype(n_rows))
        at = row = 0
        for table, codes in pieces:
            m = table.num_rows
            labelled = codes >= 0
            if "split" in table.column_names:
                labelled &= splits.codes(table.column("split")) == splits.code_of("train")
            keep = slice(None) if labelled.all() else np.flatnonzero(labelled)
            k = m if isinstance(keep, slice) else len(keep)
            part = slice(at, at + k)
            if isinstance(keep, slice):
                rows[part] = np.arange(row, row + m)
            else:
                np.add(keep, row, out=rows[part], casting="unsafe")  # row + m < n_rows fits rows' type
            cell[part] = codes[keep]
            source_codes = sources.codes(table.column("source"))[keep]
            if k and source_codes.min() < 0:
                raise FramelmError(f"{where}: a labelled document has no source")
            if len(sources.values) > np.iinfo(source.dtype).max:
                source = source.astype(np.int32)
            source[part] = source_codes
            n_tokens = table.column("n_tokens")
            if n_tokens.null_count:
                raise FramelmError(f"{where}: n_tokens is missing in some rows; re-run framelm score")
            n_tokens = n_tokens.to_numpy()[keep]
            if k and n_tokens.min() < 0:
                raise FramelmError(f"{where}: negative n_tokens in row {row + int(np.flatnonzero(n_tokens < 0)[0])}")
            if k and n_tokens.max() >= np.iinfo(weight.dtype).max:
                weight = weight.astype(np.int64)
            np.add(n_tokens, 1, out=weight[part], casting="unsafe")  # checked to fit just above
            at += k
            row += m
        source_names = sorted(sources.values)
        source, order = source[:at], np.array([source_names.index(v) for v in sources.values] or [0], source.dtype)
        for lo in range(0, at, 1 << 22):  # renumbered in place, by name, a slice at a time
            source[lo:lo + (1 << 22)] = order[source[lo:lo + (1 << 22)]]
        return cls(weight=weight[:at], cell=cell[:at], source=source, cell_names=cell_names,
                   cell_bins=[(int(c["ppl_bin"]), int(c["pd_bin"])) for c in cells], source_names=source_names,
                   rows=rows[:at], path=path)


def code_dtype(n_values: int) -> type:
    """The integer type of codes for `n_values` categories (cells, sources, stages)."""
    return np.int16 if n_values <= np.iinfo(np.int16).max else np.int32


def _read_ids(path: Path) -> Any:
    """Every id of a Parquet file as one contiguous string array. Each row group is copied in
    as it is read and then freed, so the column is in memory once; Arrow's take on a chunked
    array would concatenate every chunk on each call (1.6 GB per call at 100 M ids)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    n, column = parquet.metadata.num_rows, parquet.schema_arrow.get_field_index("id")
    # Plain-encoded strings take 4 bytes more each than their characters: a bound on the bytes
    # (pages never written to are never touched). A shortfall (repeated ids) grows the buffer.
    bound = sum(parquet.metadata.row_group(g).column(column).total_uncompressed_size for g in range(parquet.num_row_groups))
    offsets = np.zeros(n + 1, np.int64 if bound >= 1 << 31 else np.int32)
    data = np.empty(bound, np.uint8)
    row = byte = 0
    for table in row_groups(parquet, ["id"]):
        for chunk in table.column("id").chunks:
            if chunk.null_count:
                raise FramelmError(f"{path}: {chunk.null_count} document(s) among rows {row}-{row + len(chunk) - 1} have no id")
            if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
                chunk = chunk.cast(pa.string())
            o = np.frombuffer(chunk.buffers()[1], np.int64 if pa.types.is_large_string(chunk.type) else np.int32, len(chunk) + 1, chunk.offset)
            d = np.frombuffer(chunk.buffers()[2], np.uint8) if chunk.buffers()[2] is not None else np.empty(0, np.uint8)
            end = byte + int(o[-1] - o[0])
            if end > len(data):
                grown = np.empty(max(2 * len(data), end), np.uint8)
                grown[:byte] = data[:byte]
                data = grown
            if end >= 1 << 31 and offsets.dtype == np.int32:
                offsets = offsets.astype(np.int64)
            data[byte:end] = d[o[0]:o[-1]]
            offsets[row + 1:row + len(chunk) + 1] = o[1:].astype(offsets.dtype) - (int(o[0]) - byte)
            row, byte = row + len(chunk), end
    kind = pa.large_string() if offsets.dtype == np.int64 else pa.string()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(data[:byte])])


def _one_chunk(ids: Any) -> Any:
    if ids.nbytes >= 1 << 31:  # one string array holds at most 2 GiB of characters
        ids = ids.cast(pa.large_string())
    return ids.combine_chunks()


def load_corpus(run: RunDir) -> Corpus:
    """The labelled split == "train" rows of scores.parquet; the ids are read in the background."""
    import pyarrow.parquet as pq

    summary_path = run.path(SUMMARY)
    if not summary_path.is_file():
        raise FramelmError(f"{summary_path} not found; run the partition stage first: framelm partition --run-dir {run.root}")
    summary = fsutil.read_json(summary_path, f"re-run: framelm partition --run-dir {run.root} --force")
    path = run.path(SCORES)
    codes, cells = read_labels(run)  # first: it refuses scores that changed after the partition
    if [c[0] for c in cells] != [c["name"] for c in summary["cells"]]:
        raise FramelmError(f"{summary_path} and the labels in {run.path('partition')} name different cells; "
                           f"re-run: framelm partition --run-dir {run.root} --force")
    ids = in_background(lambda: _read_ids(path))

    def pieces() -> Iterable[tuple[Any, np.ndarray]]:
        at = 0
        for table in row_groups(pq.ParquetFile(path, read_dictionary=["source", "split"]), ["source", "n_tokens", "split"]):
            yield table, codes[at:at + table.num_rows]
            at += table.num_rows

    corpus = Corpus.read(pieces(), len(codes), summary["cells"], path=path)
    corpus.ids = ids
    if not len(corpus.weight):
        raise FramelmError(f"{path}: no labelled document has split 'train'; nothing to schedule")
    return corpus
