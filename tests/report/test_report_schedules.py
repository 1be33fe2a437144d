"""framelm.report.schedules: each schedule's composition over the stream, and its stage lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from framelm.errors import FramelmError
from framelm.report import ReportConfig, build_report
from framelm.rundir import RunDir
from report_fixtures import SOURCES, make_run, page_images


def test_names_from_the_run_are_escaped(tmp_path):
    run = make_run(tmp_path / "run", parts=("schedule",))
    run.path("schedule", "frame").rename(run.path("schedule", "fr<i>ame"))
    build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "<i>" not in text and "Schedule 'fr&lt;i&gt;ame'" in text
    assert "schedule-fr_i_ame.png" in page_images(run.path("report")).srcs


def test_unsorted_order_is_refused_with_the_row(tmp_path):
    run = make_run(tmp_path / "run", parts=("schedule",))
    path = run.path("schedule", "frame", "order.parquet")
    t = pq.read_table(path)
    position = t["position"].to_numpy().copy()
    position[[5, 6]] = position[[6, 5]]
    pq.write_table(t.set_column(0, "position", pa.array(position)), path)
    with pytest.raises(FramelmError, match=r"frame/order\.parquet: row 6: 'position' 5 does not increase"):
        build_report(ReportConfig(), run)


def test_schedule_plot_counts_stream_tokens_as_stages_yaml_does(tmp_path, monkeypatch):
    """The schedule plot's token axis is the stream's (each document's tokens and its EOS, as in
    stages.yaml and the export), so the stage lines sit where the shares change; a stage without
    documents (its budget rounded to none) still gets its line, and the later stages keep their names."""
    from framelm import plots
    from framelm.partition import PartitionConfig, partition_documents
    from framelm.schedule import ScheduleConfig, build_schedules, load_stages

    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(0)
    n = 600
    run.path("score").mkdir()
    pq.write_table(pa.table({  # short documents: the EOS is a quarter of the stream
        "id": [f"d{i}" for i in range(n)], "source": rng.choice(SOURCES, n), "split": ["train"] * n,
        "n_tokens": rng.integers(1, 6, n), "ppl": rng.lognormal(2, 0.5, n), "pd": rng.beta(2, 5, n), "status": ["ok"] * n,
    }), run.path("score", "scores.parquet"))
    partition_documents(PartitionConfig(), run)
    build_schedules(ScheduleConfig(transition="hard"), run)
    drawn = {}
    monkeypatch.setattr(plots, "schedule_areas", lambda path, title, total, centres, groups, shares, boundaries, *a:
                        drawn.update({Path(path).name: (total, centres, groups, shares, boundaries)}))
    build_report(ReportConfig(), run)
    info = load_stages(run.path("schedule", "frame", "stages.yaml"))
    total, centres, groups, shares, boundaries = drawn["schedule-frame.png"]
    assert total == info["total_tokens"]
    assert boundaries == [(s["name"], s["start_token"]) for s in info["stages"]]
    width = total / shares.shape[1]
    for s in info["stages"]:  # hard switches: a bin wholly inside a stage holds only its quadrant
        inside = (centres > s["start_token"] + width) & (centres < s["end_token"] - width)
        assert inside.any() and (shares[groups.index(s["name"]), inside] == 1).all()

    stages_yaml = run.path("schedule", "frame", "stages.yaml")
    data = yaml.safe_load(stages_yaml.read_text())
    q4 = data["stages"][1]
    data["stages"].insert(1, {**q4, "name": "empty", "end_token": q4["start_token"], "docs": 0, "tokens": 0})
    stages_yaml.write_text(yaml.safe_dump(data))
    order = pq.read_table(run.path("schedule", "frame", "order.parquet"))
    stage = order["stage"].to_numpy()
    pq.write_table(order.set_column(2, "stage", pa.array(np.where(stage >= 1, stage + 1, stage).astype(np.int32))),
                   run.path("schedule", "frame", "order.parquet"))
    build_report(ReportConfig(), run)
    assert [name for name, _ in drawn["schedule-frame.png"][4]] == ["Q3", "empty", "Q4", "Q1", "Q2"]
