"""framelm.report.quadrants: the scores and quadrants section, its cut lines and its table."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.errors import FramelmError
from framelm.labels import read_labelled, write_labels
from framelm.report import ReportConfig, build_report
from framelm.report.quadrants import lines_from_data, stated_lines
from framelm.rundir import RunDir
from report_fixtures import write_partition


def test_quadrant_table_matches_the_data(full_report):
    run, _ = full_report
    text = run.path("report", "index.html").read_text()
    t = read_labelled(run).to_pandas()
    train = t[t.split == "train"]
    assert len(train) < len(t)
    for q, g in train.groupby("quadrant"):
        share = g.n_tokens.sum() / train.n_tokens.sum()
        assert f"<td>{q}</td><td>{len(g):,}</td><td>{g.n_tokens.sum():,}</td><td>{share:.1%}</td>" in text
    assert "no_score: 3" in text


def test_cut_lines_from_bins_and_stratified_overlap():
    # two PPL bins split at 10..20, PD cut 0.2..0.3 inside bin 0 and 0.5..0.6 inside bin 1
    ranges = [(0, 0, 1.0, 10.0, 0.0, 0.2), (0, 1, 2.0, 9.0, 0.3, 0.9),
              (1, 0, 20.0, 90.0, 0.1, 0.5), (1, 1, 25.0, 99.0, 0.6, 0.8)]
    ppl_cuts, segments = lines_from_data(ranges, 1.0, 100.0)
    assert ppl_cuts == [pytest.approx(math.sqrt(200.0))]
    assert segments == [(1.0, pytest.approx(math.sqrt(200.0)), pytest.approx(0.25)),
                        (pytest.approx(math.sqrt(200.0)), 100.0, pytest.approx(0.55))]
    overlapping = ranges + [(0, 0, 1.0, 30.0, 0.0, 0.2)]  # another source's bin 0 reaches past bin 1's start
    assert lines_from_data(overlapping, 1.0, 100.0) is None


def test_stated_cut_points_nested_and_stratified(tmp_path):
    nested = {"cut_points": [{"axis": "ppl", "source": None, "ppl_bin": None, "cuts": [10.0]},
                             {"axis": "pd", "source": None, "ppl_bin": 0, "cuts": [0.2]},
                             {"axis": "pd", "source": None, "ppl_bin": 1, "cuts": [0.5]}]}
    where = tmp_path / "summary.json"
    assert stated_lines(nested, where, None, 1.0, 100.0) == ([10.0], [(1.0, 10.0, 0.2), (10.0, 100.0, 0.5)])
    assert stated_lines(nested, where, "web", 1.0, 100.0) == stated_lines(nested, where, None, 1.0, 100.0)
    stratified = {"cut_points": [{"axis": "ppl", "source": "web", "ppl_bin": None, "cuts": [5.0]},
                                 {"axis": "pd", "source": "web", "ppl_bin": None, "cuts": [0.3]}]}
    assert stated_lines(stratified, where, None, 1.0, 100.0) is None
    assert stated_lines(stratified, where, "web", 1.0, 100.0) == ([5.0], [(1.0, 100.0, 0.3)])
    assert stated_lines(stratified, where, "books", 1.0, 100.0) is None
    with pytest.raises(FramelmError, match=r"summary\.json: cut_points\[0\]"):
        stated_lines({"cut_points": [{"axis": "ppl", "cuts": "10"}]}, where, None, 1.0, 100.0)


def test_report_without_summary_cuts_draws_cuts_from_the_bins(tmp_path, monkeypatch):
    root = tmp_path / "run"
    root.mkdir()
    write_partition(root, np.random.default_rng(0), with_cuts=False)
    monkeypatch.setattr("framelm.report.quadrants.SAMPLE_DOCS", 100)  # 400 documents: ranges and medians from every 4th
    build_report(ReportConfig(), RunDir(root))
    text = (root / "report" / "index.html").read_text()
    assert "the boundaries between the quadrant bins" in text and "No lines on" not in text
    assert "medians over one document in every 4." in text
    t = read_labelled(RunDir(root)).to_pandas().iloc[::4]
    q1 = t[(t.split == "train") & (t.quadrant == "Q1")]
    assert f"<td>{np.median(q1.ppl):.4g}</td><td>{np.median(q1.pd):.3g}</td>" in text


def test_bad_parquet_columns_are_named(tmp_path):
    root = tmp_path / "run"
    for stage in ("score", "partition"):
        (root / stage).mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "ppl": [1.0]}), root / "score" / "scores.parquet")
    write_labels(root / "partition" / "quadrants.parquet", root / "score" / "scores.parquet", [("Q1", 0, 0)], [[0]])
    with pytest.raises(FramelmError, match=r"scores\.parquet: missing column\(s\) source, n_tokens, pd"):
        build_report(ReportConfig(), RunDir(root))
