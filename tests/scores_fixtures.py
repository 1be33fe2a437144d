"""A scores.parquet for the partition and label-file tests (a module of its own rather than
conftest.py, as tests/export/export_fixtures.py is)."""

import pyarrow as pa
import pyarrow.parquet as pq

from framelm.rundir import RunDir


def write_scores(run: RunDir, rows: dict) -> None:
    n = len(rows["ppl"])
    table = {
        "id": rows.get("id", [f"d{i:04d}" for i in range(n)]),
        "source": rows.get("source", ["web"] * n),
        "split": rows.get("split", ["train"] * n),
        "n_tokens": pa.array(rows.get("n_tokens", [10] * n), pa.int64()),
        "ppl": pa.array(rows["ppl"], pa.float64()),
        "pd": pa.array(rows["pd"], pa.float64()),
        "status": rows.get("status", ["ok"] * n),
    }
    run.path("score").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), run.path("score/scores.parquet"))
