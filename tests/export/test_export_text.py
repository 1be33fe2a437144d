"""Raw-text export per segment, Parquet and JSON lines, checked against the ingested documents."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from export_fixtures import STAGE_NAMES
from framelm.export import ExportConfig, export_schedules


def _rows(out, files, fmt):
    rows = []
    for f in files:
        path = out / f["file"]
        if fmt == "parquet":
            part = pq.read_table(path).to_pylist()
        else:
            part = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert [r["position"] for r in part] == list(range(f["first_doc"], f["end_doc"]))
        rows.extend(part)
    return rows


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_text_rows_follow_the_schedule(tiny_run, fmt, monkeypatch):
    monkeypatch.setattr("framelm.export.text.ROWS_PER_GROUP", 4)  # several row groups per file
    monkeypatch.setattr("framelm.export.text.FETCH_ROWS", 5)  # batches straddle segment edges
    export_schedules(ExportConfig(formats=["text"], text_format=fmt), tiny_run.run)
    out = tiny_run.run.path("export", "frame", "text")
    files = json.loads((out / "files.json").read_text())["files"]
    assert sorted(p.name for p in out.glob(f"*.{fmt}")) == [f["file"] for f in files]
    rows = _rows(out, files, fmt)
    order = tiny_run.order.to_pylist()
    assert len(rows) == len(order)
    for got, want in zip(rows, order):
        assert got["id"] == want["id"] and got["epoch"] == want["epoch"] and got["source"] == want["source"]
        assert got["stage"] == STAGE_NAMES[want["stage"]]
        assert got["text"] == tiny_run.doc_text[want["id"]]
    if fmt == "parquet":
        assert pq.ParquetFile(out / files[0]["file"]).metadata.num_row_groups > 1


def test_a_document_listed_twice_in_ingest_is_refused(tiny_run):
    import pyarrow as pa

    from framelm.errors import FramelmError

    part = tiny_run.run.path("ingest", "documents", "part-00001.parquet")
    docs = pq.read_table(part)
    pq.write_table(pa.concat_tables([docs, docs.slice(0, 1)]), part)  # a copy of its first document
    copied = docs.column("id")[0].as_py()
    position = tiny_run.order.column("id").to_pylist().index(copied)
    with pytest.raises(FramelmError, match=f"position {position}: id '{copied}' is listed more than once"):
        export_schedules(ExportConfig(formats=["text"]), tiny_run.run)
