"""framelm.report.extremes: the highest- and lowest-PPL documents with the start of their text."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from framelm.report import ReportConfig, build_report
from framelm.rundir import RunDir
from report_fixtures import write_partition


def rows_of(html: str) -> list[str]:
    table = html[html.index("highest- and lowest-perplexity documents"):]
    return table[: table.index("</table>")].split("<tr>")[2:]


def test_the_ends_of_the_ppl_axis_are_listed_in_order(full_report):
    run, _ = full_report
    scores = pq.read_table(run.path("score", "scores.parquet")).to_pandas().sort_values("ppl")
    rows = rows_of(run.path("report", "index.html").read_text())
    assert len(rows) == 20
    highest, lowest = scores.id.iloc[::-1][:10].tolist(), scores.id[:10].tolist()
    assert [r.split("</td>")[1].removeprefix("<td>") for r in rows] == highest + lowest
    assert all(r.startswith("<td>highest") for r in rows[:10]) and all(r.startswith("<td>lowest") for r in rows[10:])
    assert "(text not in ingest/documents)" in rows[0]  # the fixture has scores but no ingested texts


def test_texts_are_read_from_ingest_flattened_and_escaped(tmp_path):
    root = tmp_path / "run"
    table = write_partition(root, np.random.default_rng(0), n_docs=60)["table"]
    top = table.column("id")[int(np.argmax(table.column("ppl").to_numpy()))].as_py()
    texts = [f"text of {i}" for i in table.column("id").to_pylist()]
    texts[table.column("id").to_pylist().index(top)] = "begin 644 roman.bmp\nM<&9A\n\n  <b>" + "x" * 300
    (root / "ingest" / "documents").mkdir(parents=True)
    pq.write_table(pa.table({"id": table.column("id"), "text": texts}), root / "ingest" / "documents" / "part-00000.parquet")
    run = RunDir(root)
    build_report(ReportConfig(extreme_docs=3), run)
    rows = rows_of(run.path("report", "index.html").read_text())
    assert len(rows) == 6
    assert f"<td>{top}</td>" in rows[0]
    assert "begin 644 roman.bmp M&lt;&amp;9A &lt;b&gt;" + "x" * 91 + "…</td>" in rows[0]  # 29 + 91 = 120 characters, one line
    build_report(ReportConfig(extreme_docs=0), run)
    assert "highest- and lowest-perplexity" not in run.path("report", "index.html").read_text()
