"""framelm.labels: the label file partition writes, read back, and refused when it or the scores changed."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.errors import FramelmError
from framelm.labels import labelled_sql, read_labelled, read_labels
from framelm.partition import PartitionConfig, partition_documents
from framelm.rundir import RunDir
from scores_fixtures import write_scores


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path / "run")


def test_label_file_lines_up_with_scores_and_refuses_changed_scores(run):
    import duckdb

    write_scores(run, {"ppl": [1, 2, float("nan"), 4, 5], "pd": [5, 4, 3, 2, 1]})
    partition_documents(PartitionConfig(), run)
    codes, cells = read_labels(run)
    assert codes.tolist()[2] == -1 and min(codes.tolist()[:2] + codes.tolist()[3:]) >= 0  # row 2 has no usable score
    assert [c[0] for c in cells] == ["Q1", "Q2", "Q3", "Q4"]
    via_duckdb = duckdb.sql(f"SELECT id, file_row_number, quadrant, ppl_bin, pd_bin FROM {labelled_sql(run)} ORDER BY file_row_number").fetchall()
    t = read_labelled(run, ["id"])
    columns = [t.column(c).to_pylist() for c in ("id", "quadrant", "ppl_bin", "pd_bin")]
    assert columns[0] == ["d0000", "d0001", "d0003", "d0004"]
    assert via_duckdb == [(i, row, q, p, d) for row, (i, q, p, d) in zip([0, 1, 3, 4], zip(*columns))]
    write_scores(run, {"ppl": [1, 2, 3, 4, 5, 6], "pd": [1, 2, 3, 4, 5, 6]})  # re-scored, not re-partitioned
    for read in (read_labels, read_labelled, labelled_sql):
        with pytest.raises(FramelmError, match=r"quadrants\.parquet labels a scores file of 5 rows.*has 6 rows.*framelm partition"):
            read(run)
    # Re-scored to the same rows and bytes, one value changed: the footer's statistics differ.
    write_scores(run, {"ppl": [1, 2, float("nan"), 4, 5], "pd": [5, 4, 3, 2, 1]})
    partition_documents(PartitionConfig(), run)
    size = run.path("score/scores.parquet").stat().st_size
    write_scores(run, {"ppl": [1, 2, float("nan"), 4, 6], "pd": [5, 4, 3, 2, 1]})
    assert run.path("score/scores.parquet").stat().st_size == size
    with pytest.raises(FramelmError, match=r"of 5 rows and .* bytes \(and other contents\): the scores changed"):
        read_labels(run)


def test_broken_label_and_score_files_are_named(run):
    write_scores(run, {"ppl": [1, 2, 3, 4], "pd": [4, 3, 2, 1]})
    partition_documents(PartitionConfig(), run)
    labels_path, scores_path = run.path("partition/quadrants.parquet"), run.path("score/scores.parquet")
    good = labels_path.read_bytes()
    # a quadrants.parquet of the earlier format (ids and scores copied, no label metadata)
    pq.write_table(pa.table({"id": ["d0000"], "quadrant": ["Q1"]}), labels_path)
    with pytest.raises(FramelmError, match=r"quadrants\.parquet: not a framelm label file.*framelm partition"):
        read_labels(run)
    labels_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(FramelmError, match=r"quadrants\.parquet: not a readable Parquet file"):
        read_labels(run)
    labels_path.write_bytes(good)
    scores_path.write_bytes(scores_path.read_bytes()[:-20])  # truncated
    with pytest.raises(FramelmError, match=r"scores\.parquet: not a readable Parquet file"):
        read_labels(run)
    scores_path.unlink()
    with pytest.raises(FramelmError, match=r"scores\.parquet not found; run the score stage first"):
        read_labels(run)


def test_a_label_outside_the_cells_is_named(run):
    write_scores(run, {"ppl": [1, 2, 3, 4], "pd": [4, 3, 2, 1]})
    partition_documents(PartitionConfig(), run)
    path = run.path("partition/quadrants.parquet")
    good = pq.read_table(path)
    labels = pa.array(["Q1", None, "Q9", "Q4"]).dictionary_encode()
    pq.write_table(pa.table({"quadrant": labels}).replace_schema_metadata(good.schema.metadata), path)
    with pytest.raises(FramelmError, match=r"quadrants\.parquet: label 'Q9' is not one of its cells \['Q1', 'Q2', 'Q3', 'Q4'\]"):
        read_labels(run)
    pq.write_table(pa.table({"quadrant": pa.array(["Q1", None, "Q3", "Q4"]).dictionary_encode()})
                   .replace_schema_metadata(good.schema.metadata), path)
    assert read_labels(run)[0].tolist() == [0, -1, 2, 3]
