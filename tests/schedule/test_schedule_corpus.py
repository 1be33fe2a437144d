"""corpus.py: the training documents read from the score and partition outputs."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.errors import FramelmError
from schedule_fixtures import make_corpus


def test_ids_are_read_into_one_array(tmp_path):
    from framelm.schedule.corpus import _read_ids

    rng = np.random.default_rng(0)
    ids = [f"d{i}-{'x' * int(rng.integers(0, 5))}" for i in range(40)]
    path = tmp_path / "scores.parquet"
    for kind in (pa.string(), pa.large_string()):
        pq.write_table(pa.table({"id": pa.array(ids, kind)}), path, row_group_size=7)  # six row groups
        got = _read_ids(path)
        assert isinstance(got, pa.Array) and got.to_pylist() == ids  # one array, not a chunked one
    # Repeated ids dictionary-encode into fewer bytes than they expand to: the buffer grows.
    repeated = ["a-rather-long-document-id"] * 300
    pq.write_table(pa.table({"id": repeated}), path, row_group_size=100, use_dictionary=True)
    assert _read_ids(path).to_pylist() == repeated
    pq.write_table(pa.table({"id": pa.array(range(10), pa.int64())}), path)  # numbers read as their text
    assert _read_ids(path).to_pylist() == [str(i) for i in range(10)]
    pq.write_table(pa.table({"id": ["a", None, "c"]}), path)
    with pytest.raises(FramelmError, match=r"scores\.parquet: 1 document\(s\) among rows 0-2 have no id"):
        _read_ids(path)


def test_table_rows_map_to_the_partition_cells_by_name():
    corpus = make_corpus([5, 6, 7, 8], ["Q4", None, "Q1", "Q3"], ["web"] * 4)
    assert [corpus.cell_names[c] for c in corpus.cell] == ["Q4", "Q1", "Q3"]  # the unlabelled row is no document
    assert corpus.weight.tolist() == [6, 8, 9]
    with pytest.raises(FramelmError, match=r"cell 'Q7' is not in the partition's cells \['Q1', 'Q2', 'Q3', 'Q4'\]"):
        make_corpus([5, 6], ["Q1", "Q7"], ["web"] * 2)
