"""framelm.report.losses: the loss curves section, from the training logs and the exports' stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from framelm.errors import FramelmError
from framelm.report import ReportConfig, build_report
from report_fixtures import SCHEDULES, make_run


def test_loss_caption_says_why_no_stage_boundary_is_drawn(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("schedule", "train"))
    build_report(ReportConfig(), run)
    assert "Dotted vertical lines" in run.path("report", "index.html").read_text()
    for name in SCHEDULES:  # single-stage exports: the file is there, with nothing to mark
        meta = run.path("export", name, "stream", "meta.json")
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "stages": [{"name": "all", "start_token": 0}]}))
    build_report(ReportConfig(), run)
    assert "each exported schedule shown has a single stage" in run.path("report", "index.html").read_text()
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "stages": ["all"]}))
    with pytest.raises(FramelmError, match=r"meta.json: field 'stages' must be a list of"):
        build_report(ReportConfig(), run)
    shutil.rmtree(run.path("export"))
    build_report(ReportConfig(), run)
    assert "no export/&lt;schedule&gt;/stream/meta.json found" in run.path("report", "index.html").read_text()


def test_bad_log_line_names_file_and_line_and_unfinished_last_line_is_skipped(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("train",))
    log = run.path("train", "frame", "seed0", "log.jsonl")
    good = log.read_text()
    log.write_text(good + '{"type": "train", "step": 41, "tok')  # a run still writing
    build_report(ReportConfig(), run)
    assert run.path("report", "loss.png").is_file()
    lines = good.splitlines()
    lines.insert(1, "{not json")
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(FramelmError, match=r"seed0/log\.jsonl: line 2: invalid JSON"):
        build_report(ReportConfig(), run)
    log.write_text(json.dumps({"type": "train", "step": 1, "tokens": "many", "loss": 1.0}) + "\n")
    with pytest.raises(FramelmError, match=r"line 1: field 'tokens' must be a number"):
        build_report(ReportConfig(), run)


def test_loss_plots_show_only_the_runs_compare_lists(tmp_path, monkeypatch):
    """An ad-hoc `framelm train --schedule random --seed 1` is not averaged into compare's random."""
    from framelm import plots

    run = make_run(tmp_path / "run", seeds=(0,), parts=("train", "compare"))
    d = run.path("train", "random", "seed1")
    d.mkdir(parents=True)
    (d / "log.jsonl").write_text("".join(json.dumps({"type": "train", "step": s, "tokens": s * 1024, "loss": 99.0}) + "\n"
                                         for s in range(1, 41)))
    drawn = {}
    original = plots.curves
    monkeypatch.setattr(plots, "curves", lambda path, panels, *a, **k: (drawn.setdefault(Path(path).name, panels),
                                                                        original(path, panels, *a, **k))[1])
    build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "Runs shown: train/frame/seed0, train/random/seed0 (those compare/results.json lists" in text
    assert "random/seed1" not in text
    curves = {c.label: c for c in drawn["loss.png"][0][2]}
    assert sorted(curves) == ["frame (1 seed)", "random (1 seed)"]
    assert max(curves["random (1 seed)"].mean) < 50  # seed 1's loss of 99 is not in the mean

    shutil.rmtree(run.path("compare"))  # without a compare result, every log is shown
    build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "train/random/seed1 (every train/*/seed*/log.jsonl found: there is no compare/results.json)" in text
