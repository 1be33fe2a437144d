import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.errors import FramelmError
from framelm.sql import connect, parquet_columns, sql_str


@pytest.fixture
def con(tmp_path):
    con = connect("1GB", 1, tmp_path / "spill")
    yield con
    con.close()


@pytest.mark.parametrize("text", ["plain", "it's", "''", "a ' b '' c", "back\\slash", "new\nline", ""])
def test_quoted_string_round_trips_through_duckdb(con, text):
    assert con.execute(f"SELECT {sql_str(text)}").fetchone()[0] == text


def test_connect_applies_every_setting(tmp_path):
    con = connect("1GB", 3, tmp_path / "it's spill")
    settings = con.execute("SELECT current_setting('memory_limit'), current_setting('threads'), "
                           "current_setting('temp_directory'), current_setting('preserve_insertion_order'), "
                           "current_setting('enable_progress_bar')").fetchone()
    con.close()
    assert settings[1:] == (3, str(tmp_path / "it's spill"), True, False)
    assert settings[0] in ("1.0 GiB", "953.6 MiB")  # DuckDB shows 1GB (10^9 bytes) in binary units


def test_parquet_columns_returns_the_columns_in_file_order(con, tmp_path):
    path = tmp_path / "it's" / "scores.parquet"  # a quote in the path must not break the query
    path.parent.mkdir()
    pq.write_table(pa.table({"b": [1], "a": ["x"], "c": [2.0]}), path)
    assert parquet_columns(con, path, ("a", "b")) == ["b", "a", "c"]


def test_missing_columns_are_named_with_the_file_and_the_remedy(con, tmp_path):
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"id": ["a"], "ppl": [1.0]}), path)
    with pytest.raises(FramelmError) as err:
        parquet_columns(con, path, ("id", "source", "ppl", "pd"), "re-run: framelm score")
    assert str(err.value) == (f"{path}: missing column(s) source, pd; expected at least id, source, ppl, pd; "
                              f"re-run: framelm score")


@pytest.mark.parametrize("content", [b"not parquet at all", b""])
def test_a_file_that_is_not_parquet_is_named(con, tmp_path, content):
    path = tmp_path / "order.parquet"
    path.write_bytes(content)
    with pytest.raises(FramelmError, match=rf"^{re.escape(str(path))}: not a readable Parquet file \(.*\); see the docs$"):
        parquet_columns(con, path, ("id",), "see the docs")


def test_a_truncated_parquet_file_is_named(con, tmp_path):
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"id": ["a", "b"]}), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(FramelmError, match=rf"^{re.escape(str(path))}: not a readable Parquet file"):
        parquet_columns(con, path, ("id",))
