"""framelm.report.build_report: the whole page and its figures, the CLI, re-runs and out-of-date inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from framelm.cli import main
from framelm.pipeline import run_stage
from framelm.report import ReportConfig, build_report
from framelm.rundir import RunDir
from report_fixtures import SOURCES, make_run, page_images, write_logs


def has_data(fig) -> bool:
    """Whether a figure draws any data: lines, collections (bands, scatter, areas), bars or images
    on some axes (an axes' own background patch and spines do not count)."""
    return any(ax.lines or ax.collections or ax.patches or ax.images for ax in fig.axes)


def assert_valid_png(path: Path, figures: dict | None = None) -> None:
    """A readable, non-trivial PNG; with `figures` (full_report's "_figures"), also one whose figure drew data:
    an empty axes with its title and labels already has many colours, so pixels alone cannot tell."""
    if figures is not None:
        assert path.name in figures and has_data(figures[path.name]), f"{path}: the figure holds no data"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 100 and im.height > 100
        # not a blank canvas: a real plot has many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20, path


def test_full_report_has_every_figure_and_references_exactly_them(full_report):
    run, counts = full_report
    report = run.path("report")
    pngs = {p.name for p in report.glob("*.png")}
    assert pngs == {"scores.png", "quadrants.png", "schedule-frame.png", "schedule-random.png", "loss.png",
                    "heldout-sets.png", "accuracy.png"}
    for name in pngs:
        assert_valid_png(report / name, counts["_figures"])
    parsed = page_images(report)
    assert sorted(parsed.srcs) == sorted(pngs)
    assert all("://" not in u and not u.startswith("//") for u in parsed.urls), parsed.urls
    text = (report / "index.html").read_text()
    assert "<script" not in text and "<link" not in text
    assert "not run yet" not in text
    assert text.count("<figcaption>") == len(pngs)
    # the verdict comes from the table: -0.05 +- 0.01 is 5 standard errors, but over 2 seeds the
    # t test has 1 degree of freedom: p = 0.13
    assert ("frame vs random: held-out loss -0.050 ± 0.010 nats (better, not significant: p = 0.13, "
            "paired t test over 2 seeds)") in text
    assert "summary.json's cut points" in text and "standard error across seeds" in text
    assert counts["figures"] == len(pngs) and counts["not_run_yet"] == 0
    assert "Runs shown: train/frame/seed0, train/frame/seed1, train/random/seed0, train/random/seed1" in text
    assert "frame vs random" in counts["summary"]


@pytest.mark.parametrize("parts,figures", [
    ((), set()),
    (("train",), {"loss.png", "heldout-sets.png"}),
    (("compare",), {"accuracy.png"}),
])
def test_missing_inputs_are_listed_as_not_run_yet(tmp_path, parts, figures):
    run = make_run(tmp_path / "run", seeds=(0,), parts=parts)
    counts = build_report(ReportConfig(), run)
    report = run.path("report")
    assert {p.name for p in report.glob("*.png")} == figures
    assert sorted(page_images(report).srcs) == sorted(figures)
    text = (report / "index.html").read_text()
    assert text.count('<p class="missing">not run yet') == counts["not_run_yet"] == 5 - counts["sections"]
    assert ("not run yet: no compare/results.json" in text) == ("compare" not in parts)
    assert ("not run yet: no train/*/seed*/log.jsonl" in text) == ("train" not in parts)
    assert ("framelm partition --run-dir" in text) == ("partition" not in parts)


def test_rerun_skips_until_an_input_changes(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("compare",))
    run_stage("report", ReportConfig(), run)
    first = run.record("report")["started"]
    run_stage("report", ReportConfig(), run)
    assert run.record("report")["started"] == first  # up to date: skipped
    assert "Loss curves" in run.path("report", "index.html").read_text().split("Sections not run yet")[1]
    write_logs(run.root, (0,), np.random.default_rng(0), steps=5)  # training has started since
    run_stage("report", ReportConfig(), run)
    assert run.record("report")["started"] != first
    assert run.path("report", "loss.png").is_file()


def test_cli_builds_the_report(tmp_path, capsys):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("compare",))
    run.update_record("compare", {"stage": "compare", "status": "done", "hash": "compare-hash"})  # the CLI wants a started run
    assert main(["report", "--run-dir", str(run.root), "--accuracy-metric", "acc_norm", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "not run yet: Scores and quadrants, Schedules, Loss curves" in out
    assert "frame vs random: held-out loss -0.050" in out
    assert "Downstream acc_norm per task" in run.path("report", "index.html").read_text()
    assert sorted(p.name for p in run.path("report").glob("*.png")) == ["accuracy.png"]


# -- against the real upstream stages ---------------------------------------------------------

@pytest.mark.parametrize("stratify", [False, True])
def test_report_reads_what_partition_and_schedule_write(tmp_path, stratify):
    from framelm.partition import PartitionConfig, partition_documents
    from framelm.schedule import ScheduleConfig, build_schedules

    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(0)
    n = 300
    source = rng.choice(SOURCES, n)
    run.path("score").mkdir()
    pq.write_table(pa.table({
        "id": [f"d{i}" for i in range(n)], "source": source, "split": np.where(rng.random(n) < 0.9, "train", "heldout"),
        "n_tokens": rng.integers(20, 400, n), "ppl": np.exp(rng.normal(3, 0.6, n) + (source == "books")),
        "pd": rng.normal(0.3, 0.1, n), "status": ["ok"] * n,
    }), run.path("score", "scores.parquet"))
    partition_documents(PartitionConfig(stratify_by_source=stratify), run)
    build_schedules(ScheduleConfig.from_dict({"strategies": [{"kind": "frame"}, {"kind": "random"},
                                                             {"kind": "random", "name": "high_ppl", "cells": ["Q3", "Q4"]}]}), run)
    build_report(ReportConfig(schedule_groups="quadrant" if stratify else "source"), run)
    text = run.path("report", "index.html").read_text()
    schedules = sorted(p.parent.name for p in run.root.glob("schedule/*/order.parquet"))
    assert schedules and sorted(page_images(run.path("report")).srcs) == sorted(
        ["scores.png", "quadrants.png"] + [f"schedule-{s}.png" for s in schedules])
    if stratify:  # per-source cut points: lines on the source panels only
        assert "summary.json's cut points; from the boundaries between the bins on all sources" in text
        assert "No lines on all sources" in text
    else:
        assert "quadrant cuts (summary.json's cut points)" in text
        assert "each band's height is that source's share" in text
    assert text.count("A selection: it keeps only the documents of cells Q3, Q4, repeated") == 1  # high_ppl's caption alone


def test_figure_check_fails_on_a_figure_without_data(tmp_path):
    """assert_valid_png with figures rejects a figure whose data were removed, though its PNG alone passes."""
    from matplotlib.figure import Figure

    from framelm import plots

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.set(title="held-out loss, all held-out documents", xlabel="tokens", ylabel="loss (nats/token)")
    line, = ax.plot([1, 2, 3], [3.0, 2.5, 2.2], label="frame")
    ax.legend()
    plots._save(fig, tmp_path / "loss.png", 110)
    assert_valid_png(tmp_path / "loss.png", {"loss.png": fig})
    line.remove()
    plots._save(fig, tmp_path / "loss.png", 110)
    assert_valid_png(tmp_path / "loss.png")  # the pixels alone pass: title, labels, ticks, legend
    with pytest.raises(AssertionError, match="holds no data"):
        assert_valid_png(tmp_path / "loss.png", {"loss.png": fig})


def test_a_schedule_made_from_an_earlier_partition_is_flagged(tmp_path):
    from framelm.partition import PartitionConfig
    from framelm.schedule import ScheduleConfig

    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(0)
    n = 300
    run.path("score").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [f"d{i}" for i in range(n)], "source": rng.choice(SOURCES, n), "split": ["train"] * n,
        "n_tokens": rng.integers(20, 400, n), "ppl": np.exp(rng.normal(3, 0.6, n)), "pd": rng.normal(0.3, 0.1, n),
        "status": ["ok"] * n,
    }), run.path("score", "scores.parquet"))
    run.update_record("score", {"stage": "score", "status": "done", "hash": "fixture"})
    run_stage("partition", PartitionConfig(ppl_quantiles=[0.33, 0.66]), run)
    run_stage("schedule", ScheduleConfig(), run)
    build_report(ReportConfig(), run)
    assert "Out of date" not in run.path("report", "index.html").read_text()
    run_stage("partition", PartitionConfig(), run)  # back to 2 x 2; the schedule is still of the 3 x 2 grid
    counts = build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "Out of date: schedule was made from an earlier result of partition" in text
    assert counts["out_of_date"] == 1 and "re-run schedule on the new partition (it was last made by: framelm schedule --run-dir" in counts["summary"]
    assert "or make partition as it was (its new result was made by: framelm partition --run-dir" in counts["summary"]
    run_stage("report", ReportConfig(), run)
    run.update_record("score", {"stage": "score", "status": "done", "hash": "rescored"})  # no file it reads changes
    assert run_stage("report", ReportConfig(), run)["out_of_date"] == 2  # re-run: partition is now out of date too
