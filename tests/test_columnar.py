import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.columnar import Categories, code_totals, in_background, row_groups


def test_row_groups_yield_every_row_in_order_and_slice_big_groups(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"x": np.arange(1000), "s": [f"v{i % 7}" for i in range(1000)]})
    pq.write_table(table, path, row_group_size=300)
    parquet = pq.ParquetFile(path)
    for max_rows in (1000, 300, 128):
        pieces = list(row_groups(parquet, ["x"], max_rows=max_rows))
        assert all(p.num_rows <= max_rows for p in pieces)
        assert np.concatenate([p.column("x").to_numpy() for p in pieces]).tolist() == list(range(1000))
    assert sum(p.num_rows for p in row_groups(pq.ParquetFile(_empty(tmp_path)), ["x"])) == 0


def test_slices_of_big_groups_are_read_from_their_own_group_when_reads_lag(tmp_path, monkeypatch):
    # The helper thread starts each read late, so the piece generator has moved on to the next
    # row group before the last slice of this one is read.
    import concurrent.futures

    class LateStartPool(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            return super().submit(lambda: (time.sleep(0.02), fn(*args, **kwargs))[1])

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", LateStartPool)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": np.arange(1000)}), path, row_group_size=300)
    pieces = list(row_groups(pq.ParquetFile(path), ["x"], max_rows=128))
    assert np.concatenate([p.column("x").to_numpy() for p in pieces]).tolist() == list(range(1000))


def _empty(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"x": pa.array([], pa.int64())}), path)
    return path


def test_categories_agree_across_pieces_with_different_dictionaries():
    cats = Categories()
    a = cats.codes(pa.array(["web", "math", None, "web"]).dictionary_encode())
    b = cats.codes(pa.chunked_array([pa.array(["books", "web"]), pa.array(["math"])]))
    assert a.tolist() == [0, 1, -1, 0] and b.tolist() == [2, 0, 1]
    assert cats.values == ["web", "math", "books"]
    assert cats.code_of("math") == 1 and cats.code_of("wiki") == -2


def test_code_totals_match_a_plain_count(monkeypatch):
    import framelm.columnar as columnar

    monkeypatch.setattr(columnar, "TALLY_SLICE_ROWS", 7)  # many slices on a small array
    rng = np.random.default_rng(0)
    codes, weights = rng.integers(0, 5, 100), rng.integers(0, 1000, 100)
    rows, sums = code_totals(codes, weights, 5)
    assert rows.tolist() == [int((codes == c).sum()) for c in range(5)]
    assert sums.tolist() == [int(weights[codes == c].sum()) for c in range(5)]
    rows_fn, _ = code_totals(lambda part: codes[part], weights, 5)
    assert rows_fn.tolist() == rows.tolist()
    huge = np.full(3, 1 << 52, np.int64)  # float64 sums would round: summed exactly instead
    assert code_totals(np.zeros(3, np.int64), huge, 1)[1].tolist() == [3 << 52]


def test_in_background_hands_back_results_and_errors():
    assert in_background(lambda: 41 + 1).result(timeout=10) == 42

    def fail():
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        in_background(fail).result(timeout=10)


def test_null_in_a_dictionary_is_a_null_row_not_a_category():
    cats = Categories(["web"])
    assert cats.codes(pa.array([None, None])).tolist() == [-1, -1]  # type null: its dictionary is [null]
    with_null = pa.DictionaryArray.from_arrays(pa.array([0, 1, 2, None], pa.int8()), pa.array(["math", None, "web"]))
    assert cats.codes(with_null).tolist() == [1, -1, 0, -1]
    assert cats.values == ["web", "math"]
