"""Reading large Parquet tables into numpy arrays, shared by partition and schedule.

At 100 M rows the way a table is read decides the stage's speed: whole row groups decode
their columns in parallel on Arrow's thread pool (`iter_batches` decodes them one after the
other and is 2-3x slower), and string columns with a handful of values (source, split,
quadrant) become small integer codes instead of Python or Arrow strings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pyarrow as pa

MAX_GROUP_ROWS = 1 << 22  # a larger row group is read in slices, so memory stays bounded


def row_groups(parquet: Any, columns: list[str], max_rows: int = MAX_GROUP_ROWS) -> Iterator[pa.Table]:
    """`columns` of a pyarrow ParquetFile, a row group (or a slice of a big one) at a time, in
    file order. The next piece is read in a helper thread while the caller works on this one."""
    from concurrent.futures import ThreadPoolExecutor

    def pieces() -> Iterator[Callable[[], pa.Table]]:
        for i in range(parquet.num_row_groups):
            if parquet.metadata.row_group(i).num_rows <= max_rows:
                yield lambda i=i: parquet.read_row_group(i, columns=columns)
            else:
                batches = parquet.iter_batches(batch_size=max_rows, row_groups=[i], columns=columns)
                for _ in range(-(-parquet.metadata.row_group(i).num_rows // max_rows)):
                    # Bound now: the helper thread may run this after `batches` is the next group's.
                    yield lambda batches=batches: pa.Table.from_batches([next(batches)])

    with ThreadPoolExecutor(1) as pool:
        pending = None
        for read in pieces():
            future = pool.submit(read)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def index_dtype(n: int) -> type:
    """The narrowest signed integer type that indexes n rows (int32 halves the memory traffic of gathers)."""
    return np.int32 if n < 1 << 31 else np.int64


class Categories:
    """Integer codes for the values of a string column read in pieces: each new value gets the
    next code, so codes agree across row groups whose own dictionaries differ. `known` values
    take codes 0, 1, ... in their order first, so codes can index a list fixed in advance."""

    def __init__(self, known: Iterable[Any] = ()) -> None:
        self.values: list[Any] = []
        self._codes: dict[Any, int] = {}
        for value in known:
            self._code(value)

    def codes(self, column: Any) -> np.ndarray:
        """int32 code of each row of a string or dictionary column (chunked or not); -1 where null."""
        import pyarrow.compute as pc

        if isinstance(column, pa.ChunkedArray):
            parts = [self.codes(chunk) for chunk in column.chunks]
            return np.concatenate(parts) if parts else np.empty(0, np.int32)
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column)
        # A dictionary may hold null itself (an all-null column's has nothing else): null rows all the same.
        lut = np.array([-1 if v is None else self._code(v) for v in column.dictionary.to_pylist()] + [-1], np.int32)
        indices = column.indices
        if indices.null_count:  # -1 picks the lut's last entry, the null code
            indices = pc.fill_null(indices, -1)
        return lut[indices.to_numpy(zero_copy_only=False)]

    def code_of(self, value: Any) -> int:
        """The code of `value`; -2 (no row's code) when it has not been seen."""
        return self._codes.get(value, -2)

    def _code(self, value: Any) -> int:
        if value not in self._codes:
            self._codes[value] = len(self.values)
            self.values.append(value)
        return self._codes[value]


def in_background(fn: Callable[[], Any]) -> Future:
    """Run fn in a daemon thread; its result (or exception) arrives through the returned Future.

    Parquet decoding and numpy's bulk operations release the GIL, so a read started here uses
    the second core while the caller computes."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=work, daemon=True, name="framelm-read").start()
    return future



TALLY_SLICE_ROWS = 1 << 22


def code_counts(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Rows per code 0..n_codes-1 (int64), a slice at a time: bincount copies narrow codes to
    int64 first, 0.8 GB of fresh memory at 100 M rows."""
    rows = np.zeros(n_codes, np.int64)
    for lo in range(0, len(codes), TALLY_SLICE_ROWS):
        rows += np.bincount(codes[lo:lo + TALLY_SLICE_ROWS], minlength=n_codes)
    return rows


def code_totals(codes: np.ndarray, weights: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, summed weights) per code 0..n_codes-1, both int64, a slice of rows at a time:
    bincount first copies its inputs to int64 and float64, which at 100 M rows is 1.6 GB of
    fresh memory. `codes` may be a callable slice -> codes, so a key need not exist whole."""
    rows, sums = np.zeros(n_codes, np.int64), np.zeros(n_codes, np.int64)
    for lo in range(0, len(weights), TALLY_SLICE_ROWS):
        part = slice(lo, lo + TALLY_SLICE_ROWS)
        c, w = (codes(part) if callable(codes) else codes[part]), weights[part]
        rows += np.bincount(c, minlength=n_codes)
        if len(w) and max(abs(int(w.min())), abs(int(w.max()))) * len(w) >= 1 << 53:
            np.add.at(sums, c, w)  # float64 sums would round
        else:
            sums += np.rint(np.bincount(c, weights=w, minlength=n_codes)).astype(np.int64)
    return rows, sums
