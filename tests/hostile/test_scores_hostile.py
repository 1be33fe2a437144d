"""Hostile scores for `framelm partition`: NaN, infinite and null PPL/PD, non-ok statuses, and
a scores file with the wrong schema. Unusable documents are counted by reason and never
labelled; a file that cannot be partitioned is a clean error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from framelm.labels import read_labelled
from framelm.rundir import RunDir

from .conftest import assert_nothing_half_written, assert_user_error


def scores_run(root: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    run = RunDir(root)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), run.stage_dir("score") / "scores.parquet")
    run.update_record("score", {"status": "done", "hash": "hostile-scores"})
    return root


def row(i: int, ppl: float | None, pd: float | None, status: str = "ok") -> dict:
    return {"id": f"d{i}", "source": "web", "split": "train", "n_tokens": 10 + i, "ppl": ppl, "pd": pd, "status": status}


def test_nan_inf_and_null_scores_are_counted_not_labelled(framelm_cli, tmp_path):
    good = [row(i, 2.0 + i, 0.01 * i) for i in range(8)]
    bad = [row(100, math.nan, 0.1), row(101, 3.0, math.nan), row(102, math.inf, 0.2), row(103, 3.0, -math.inf),
           row(104, None, 0.3), row(105, 4.0, None), row(106, None, None, status="empty")]
    run = scores_run(tmp_path / "run", good + bad)
    result = framelm_cli("partition", "--run-dir", run, "--quiet", "--threads", "1")
    assert result.code == 0, result.err
    labelled = read_labelled(RunDir(run)).to_pylist()
    assert sorted(r["id"] for r in labelled) == sorted(r["id"] for r in good)
    assert all(math.isfinite(r["ppl"]) and math.isfinite(r["pd"]) for r in labelled)
    summary = json.loads((run / "partition" / "summary.json").read_text())
    assert summary["excluded"] == {"nan_ppl": 1, "nan_pd": 1, "inf_ppl": 1, "inf_pd": 1, "missing_ppl": 1,
                                   "missing_pd": 1, "empty": 1}


def test_only_unusable_scores_is_an_error_naming_the_reasons(framelm_cli, tmp_path):
    run = scores_run(tmp_path / "run", [row(i, math.nan, 0.1) for i in range(5)])
    result = framelm_cli("partition", "--run-dir", run, "--quiet", "--threads", "1")
    assert_user_error(result, str(run / "score" / "scores.parquet"), "no document with split 'train' has a usable score", "nan_ppl")
    assert_nothing_half_written(run, "partition")
    assert not (run / "partition" / "quadrants.parquet").exists()


def test_scores_with_the_wrong_schema(framelm_cli, tmp_path):
    rows = [{"id": f"d{i}", "perplexity": 2.0 + i, "status": "ok"} for i in range(5)]
    run = scores_run(tmp_path / "run", rows)
    result = framelm_cli("partition", "--run-dir", run, "--quiet", "--threads", "1")
    assert_user_error(result, str(run / "score" / "scores.parquet"), "ppl")
    assert_nothing_half_written(run, "partition")


def test_scores_that_are_not_parquet(framelm_cli, tmp_path):
    run = scores_run(tmp_path / "run", [row(0, 2.0, 0.1)])
    (run / "score" / "scores.parquet").write_bytes(b"PAR1\x00\x00 garbage")
    result = framelm_cli("partition", "--run-dir", run, "--quiet", "--threads", "1")
    assert_user_error(result, str(run / "score" / "scores.parquet"))
    assert_nothing_half_written(run, "partition")
