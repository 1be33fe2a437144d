"""Export reads what the real schedule stage writes (frame with logistic transitions, random, and
a selection of cells)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from export_fixtures import build_tiny_run
from framelm.export import ExportConfig, export_schedules
from framelm import schedule
from framelm.labels import write_labels

CELLS = [("Q1", 0, 0), ("Q2", 0, 1), ("Q3", 1, 0), ("Q4", 1, 1)]


def test_export_of_real_schedules(tmp_path):
    tiny = build_tiny_run(tmp_path / "run", n_docs=160)
    index = pq.read_table(tiny.run.path("tokenize", "index.parquet"))
    n = index.num_rows
    cell = np.arange(n) % 4
    scores = pa.table({
        "id": index.column("id"), "source": index.column("source"), "split": ["train"] * n,
        "n_tokens": index.column("n_tokens"), "ppl": np.linspace(1, 2, n), "pd": np.linspace(0, 1, n)})
    tiny.run.path("score").mkdir()
    pq.write_table(scores, tiny.run.path("score", "scores.parquet"))
    tiny.run.path("partition").mkdir()
    write_labels(tiny.run.path("partition", "quadrants.parquet"), tiny.run.path("score", "scores.parquet"), CELLS, [cell])
    tiny.run.path("partition", "summary.json").write_text(json.dumps(
        {"cells": [{"name": name, "ppl_bin": p, "pd_bin": d} for name, p, d in CELLS]}))
    schedule.build_schedules(schedule.ScheduleConfig.from_dict(
        {"seq_len": 8, "global_batch": 2, "transition_window": 0.5,
         "strategies": [{"kind": "frame"}, {"kind": "random"}, {"kind": "frame", "name": "high_ppl", "cells": ["Q3", "Q4"]}]}),
        tiny.run)

    export_schedules(ExportConfig(formats=["stream", "megatron"]), tiny.run)
    tokens = np.fromfile(tiny.run.path("tokenize", "tokens.bin"), dtype=np.uint16)
    offsets = dict(zip(index.column("id").to_pylist(), index.column("offset").to_pylist()))
    for name in ("frame", "random", "high_ppl"):
        order = pq.read_table(tiny.run.path("schedule", name, "order.parquet")).to_pylist()
        expected = np.concatenate([tokens[offsets[r["id"]]: offsets[r["id"]] + r["n_tokens"] + 1] for r in order])
        stream = np.fromfile(tiny.run.path("export", name, "stream", "tokens.bin"), dtype=np.uint16)
        np.testing.assert_array_equal(stream, expected)
        segments = json.loads(tiny.run.path("export", name, "segments.json").read_text())["segments"]
        assert sum(s["tokens"] for s in segments) == len(expected)
    frame_segments = json.loads(tiny.run.path("export", "frame", "segments.json").read_text())["segments"]
    assert [s["name"] for s in frame_segments if s["kind"] == "stage"] == ["Q3", "Q4", "Q1", "Q2"]
    assert any(s["kind"] == "transition" for s in frame_segments)  # logistic windows were found
    high_segments = json.loads(tiny.run.path("export", "high_ppl", "segments.json").read_text())["segments"]
    assert [s["name"] for s in high_segments if s["kind"] == "stage"] == ["Q3", "Q4"]
