"""A killed export restarts where it stopped and ends byte-identical; the stage runs via the pipeline."""

from __future__ import annotations

import logging
import shutil

import pytest

from export_fixtures import read_tree
from framelm import fsutil
from framelm.export import ExportConfig, export_schedules
from framelm.export.plan import ExportPlan
from framelm.pipeline import run_stage

ALL = ExportConfig(formats=["stream", "llmc", "megatron", "nanotron", "text"], llmc_shard_tokens=64, chunk_tokens=32)


def test_restart_after_a_kill_is_byte_identical(tiny_run, monkeypatch, caplog):
    export_dir = tiny_run.run.path("export")
    uninterrupted_counts = export_schedules(ALL, tiny_run.run)
    reference = read_tree(export_dir)

    shutil.rmtree(export_dir)
    calls = {"n": 0}
    real_read = ExportPlan.read

    def read_then_die(self, begin, end):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt  # stands in for a kill in the middle of writing a file
        return real_read(self, begin, end)

    monkeypatch.setattr(ExportPlan, "read", read_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_schedules(ALL, tiny_run.run)
    monkeypatch.setattr(ExportPlan, "read", real_read)
    partial = read_tree(export_dir)
    assert 0 < len(partial) < len(reference)
    assert all(reference[k] == v for k, v in partial.items())

    # what a SIGKILL leaves behind: a temp file beside a missing shard, and a finished file
    # whose .done marker was never written
    llmc = export_dir / "frame" / "llmc"
    (llmc / "train_000005.bin.tmp-4242").write_bytes(b"half a shard")
    fsutil.done_marker(llmc / "train_000001.bin").unlink()
    (llmc / "train_000001.bin").write_bytes(b"stale")
    export_schedules(ALL, tiny_run.run)
    frame = export_dir / "frame"
    for done in ("text/005_Q4.parquet", "nanotron/000_Q3/000_000_Q3.ds.index", "megatron/010_Q1.idx"):
        fsutil.done_marker(frame / done).unlink()
    (frame / "text" / "005_Q4.parquet").unlink()

    with caplog.at_level(logging.INFO, logger="framelm"):
        counts = export_schedules(ALL, tiny_run.run)
    assert "files were already finished" in caplog.text  # finished files were not rewritten
    assert read_tree(export_dir) == reference
    assert counts == uninterrupted_counts  # the counts describe the output, not the history


def test_export_runs_as_a_pipeline_stage(tiny_run):
    for upstream in ("schedule", "tokenize"):
        tiny_run.run.update_record(upstream, {"stage": upstream, "status": "done", "hash": f"{upstream}-hash"})
    cfg = ExportConfig(formats=["stream", "llmc"])
    counts = run_stage("export", cfg, tiny_run.run)
    assert counts["files"] == 2 and counts["frame"]["tokens"] == len(tiny_run.expected_stream())
    assert tiny_run.run.record("export")["status"] == "done"
    assert run_stage("export", cfg, tiny_run.run) == counts  # up to date: skipped
    assert set(cfg.upstream()) == {"schedule", "tokenize"}
    assert "ingest" in ExportConfig(formats=["text"]).upstream()


def test_text_export_killed_mid_file_resumes_identically(tiny_run, monkeypatch):
    from framelm.export import text

    monkeypatch.setattr(text, "ROWS_PER_GROUP", 4)
    monkeypatch.setattr(text, "FETCH_ROWS", 5)
    cfg = ExportConfig(formats=["text"])
    out = tiny_run.run.path("export", "frame", "text")
    export_schedules(cfg, tiny_run.run)
    reference = read_tree(out)
    shutil.rmtree(out)

    calls = {"n": 0}
    real_flush = text._SegmentSink._flush

    def flush_then_die(self, final):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_flush(self, final)

    monkeypatch.setattr(text._SegmentSink, "_flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_schedules(cfg, tiny_run.run)
    monkeypatch.setattr(text._SegmentSink, "_flush", real_flush)
    partial = read_tree(out)
    assert partial and all(".tmp-" not in name for name in partial)  # the half-written file was dropped
    assert len(partial) < len(reference)
    export_schedules(cfg, tiny_run.run)
    assert read_tree(out) == reference
