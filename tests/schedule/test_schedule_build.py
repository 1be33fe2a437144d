"""build.py: the whole stage end to end (order.parquet, stages.yaml, warnings, CLI, resume)."""

import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.errors import ConfigError, FramelmError
from framelm.labels import read_labelled
from framelm.partition import PartitionConfig, partition_documents
from framelm.rundir import RunDir
from framelm.schedule import ScheduleConfig, Stage, assemble, build_schedules, load_stages
from schedule_fixtures import write_yaml


def order(run, name):
    return pq.read_table(run.path(f"schedule/{name}/order.parquet")).to_pandas()


def build(run, strategies, **kw):
    return build_schedules(ScheduleConfig.from_dict({"strategies": strategies, **kw}), run)


def test_frame_orders_q3_q4_q1_q2_over_train_documents(run):
    build(run, [{"kind": "frame"}], transition="hard")
    info = load_stages(run.path("schedule/frame/stages.yaml"))
    assert [s["name"] for s in info["stages"]] == ["Q3", "Q4", "Q1", "Q2"]
    o = order(run, "frame")
    assert o.quadrant.tolist() == sorted(o.quadrant, key=["Q3", "Q4", "Q1", "Q2"].index)
    assert (o.stage.values == o.quadrant.map({"Q3": 0, "Q4": 1, "Q1": 2, "Q2": 3}).values).all()
    labelled = read_labelled(run, ["id", "split"]).to_pandas()
    assert sorted(o.id) == sorted(labelled.id[labelled.split == "train"])  # one pass, labelled train documents only
    assert "d0001" not in set(o.id) and len(o) == 539
    assert o.position.tolist() == list(range(len(o))) and set(o.epoch) == {0}
    # budgets proportional to quadrant tokens: one pass gives exactly each quadrant's tokens
    by_cell = (o.n_tokens + 1).groupby(o.quadrant).sum()
    assert {s["name"]: s["tokens"] for s in info["stages"]} == by_cell.to_dict()


def test_stage_ranges_match_order_parquet(run):
    counts = build(run, [{"kind": "frame"}, {"kind": "two_phase", "blends": [{"web": 1.0}, {"math": 0.5, "books": 0.5}]}],
                   seq_len=16, global_batch=4, total_tokens=30_000)
    assert "frame: Q3" in counts["summary"]
    for name in ("frame", "two_phase"):
        info = load_stages(run.path(f"schedule/{name}/stages.yaml"))
        o = order(run, name)
        w = o.n_tokens + 1
        assert info["total_tokens"] == int(w.sum()) and info["total_docs"] == len(o)
        assert info["tokens_per_step"] == 64 and info["total_steps"] == info["total_tokens"] // 64
        assert info["tail_tokens"] == info["total_tokens"] % 64
        start = 0
        for k, s in enumerate(info["stages"]):
            assert s["start_token"] == start and s["end_token"] - s["start_token"] == s["tokens"]
            assert s["tokens"] == int(w[o.stage == k].sum()) and s["docs"] == int((o.stage == k).sum())
            assert s["start_step"] == s["start_token"] // 64
            assert s["end_step"] == min(-(-s["end_token"] // 64), info["total_steps"])  # no step a trainer skips
            assert abs(sum(s["composition"]["cells"].values()) - 1) < 1e-5
            assert abs(sum(s["composition"]["sources"].values()) - 1) < 1e-5
            start = s["end_token"]
        # a stage's documents sit around its nominal range: at most the transition window outside it
        cum = np.concatenate([[0], np.cumsum(w.values)])
        for k, s in enumerate(info["stages"]):
            pos = cum[:-1][o.stage.values == k]
            slack = 0.06 * s["tokens"] + 80
            assert pos.min() >= s["start_token"] - slack and pos.max() < s["end_token"] + slack


@pytest.mark.parametrize("total_tokens", [None, 9_000, 60_000])
def test_random_and_frame_schedule_the_same_documents(run, total_tokens):
    strategies = [{"kind": "frame"}, {"kind": "random"}, {"kind": "permutation", "order": ["Q2", "Q1", "Q4", "Q3"]},
                  {"kind": "ppl_two_stage"}, {"kind": "pd_two_stage"}, {"kind": "sorted", "column": "pd"}]
    build(run, strategies, total_tokens=total_tokens)
    bags = {s["kind"]: Counter(zip(order(run, s["kind"]).id, order(run, s["kind"]).epoch)) for s in strategies}
    assert all(bag == bags["frame"] for bag in bags.values())
    f, r = order(run, "frame"), order(run, "random")
    assert f.id.tolist() != r.id.tolist()
    if total_tokens:
        assert abs(int((f.n_tokens + 1).sum()) - total_tokens) <= 4 * 80  # one document per cell at most
    if total_tokens == 60_000:
        assert f.epoch.max() >= 1
        info = load_stages(run.path("schedule/frame/stages.yaml"))
        data = sum(s["available_tokens"] for s in info["sources"].values())
        for s in info["sources"].values():
            assert s["epochs"] == pytest.approx(60_000 / data, rel=0.05)


def test_sorted_and_permutation_orders(run):
    build(run, [{"kind": "sorted", "column": "pd", "descending": True, "n_stages": 2},
                {"kind": "permutation", "name": "reverse", "order": ["Q2", "Q1", "Q4", "Q3"]}], transition="hard")
    o = order(run, "sorted")
    q = read_labelled(run).to_pandas().set_index("id")
    pd = q.loc[o.id, "pd"].values
    assert (np.diff(pd) <= 0).all()
    assert [s["name"] for s in load_stages(run.path("schedule/sorted/stages.yaml"))["stages"]] == ["pd_desc_1", "pd_desc_2"]
    assert order(run, "reverse").quadrant.drop_duplicates().tolist() == ["Q2", "Q1", "Q4", "Q3"]


def test_two_stage_splits(run):
    build(run, [{"kind": "ppl_two_stage"}, {"kind": "pd_two_stage"}], transition="hard")
    o = order(run, "ppl_two_stage")
    assert set(o[o.stage == 0].quadrant) == {"Q3", "Q4"} and set(o[o.stage == 1].quadrant) == {"Q1", "Q2"}
    o = order(run, "pd_two_stage")
    assert set(o[o.stage == 0].quadrant) == {"Q1", "Q3"} and set(o[o.stage == 1].quadrant) == {"Q2", "Q4"}


def test_yaml_schedule_builds_stages_by_source(run, tmp_path):
    path = write_yaml(tmp_path, "stages:\n - {name: warm, tokens: 4000, mix: {web: 0.8, math: 0.2}}\n"
                                " - {name: main, tokens: 6000, mix: {books: 0.5, math: 0.5}}\nepoch_caps: {math: 10}\n")
    build(run, [{"kind": "yaml", "name": "custom", "path": str(path)}], transition="hard")
    info = load_stages(run.path("schedule/custom/stages.yaml"))
    assert [s["name"] for s in info["stages"]] == ["warm", "main"]
    assert abs(info["stages"][0]["tokens"] - 4000) <= 160 and abs(info["stages"][1]["tokens"] - 6000) <= 160
    assert info["stages"][0]["composition"]["sources"]["web"] == pytest.approx(0.8, abs=0.03)
    assert set(info["stages"][1]["composition"]["sources"]) == {"books", "math"}


def test_a_killed_run_resumes_to_the_same_files(run):
    strategies = [{"kind": "frame"}, {"kind": "random"}]
    build(run, strategies, total_tokens=20_000)
    files = {p: p.read_bytes() for p in run.path("schedule").rglob("*") if p.is_file()}
    # as if killed after frame finished: random's files are gone, frame's marker says done
    for p in run.path("schedule/random").iterdir():
        p.unlink()
    (run.path("schedule/frame/order.parquet")).touch()  # a finished strategy is not rebuilt
    mtime = run.path("schedule/frame/order.parquet").stat().st_mtime_ns
    build(run, strategies, total_tokens=20_000)
    assert run.path("schedule/frame/order.parquet").stat().st_mtime_ns == mtime
    assert {p: p.read_bytes() for p in run.path("schedule").rglob("*") if p.is_file()} == files


def test_missing_partition_is_explained(tmp_path):
    with pytest.raises(FramelmError, match="run the partition stage first"):
        build_schedules(ScheduleConfig(), RunDir(tmp_path / "empty"))


def test_cli_runs_partition_then_schedule_and_writes_exactly_the_contract_files(tmp_path, capsys):
    from framelm.cli import main

    run = RunDir(tmp_path / "cli")
    run.path("score").mkdir(parents=True)
    rng = np.random.default_rng(5)
    pq.write_table(pa.table({
        "id": [f"d{i}" for i in range(80)], "source": ["web", "math"] * 40, "split": ["train"] * 80,
        "n_tokens": pa.array(rng.integers(1, 30, 80), pa.int64()), "ppl": rng.lognormal(size=80),
        "pd": rng.uniform(size=80), "status": ["ok"] * 80,
    }), run.path("score/scores.parquet"))
    run.update_record("score", {"stage": "score", "status": "done", "hash": "fixture"})
    assert main(["partition", "--run-dir", str(run.root), "--quiet"]) == 0
    assert main(["schedule", "--run-dir", str(run.root), "--quiet", "--seq-len", "8", "--global-batch", "2",
                 "--set", "strategies=[{kind: frame}, {kind: random}, {kind: permutation, name: reverse, order: [Q2, Q1, Q4, Q3]}]"]) == 0
    out = capsys.readouterr().out
    assert "frame: Q3" in out and "reverse: Q2" in out
    written = sorted(str(p.relative_to(run.path("schedule"))) for p in run.path("schedule").rglob("*") if p.is_file())
    assert written == [".framelm-hash"] + [f"{s}/{f}" for s in ("frame", "random", "reverse")
                                           for f in (".stages.yaml.done", "order.parquet", "stages.yaml")]
    assert run.record("schedule")["status"] == "done"
    schema = pq.read_schema(run.path("schedule/frame/order.parquet"))
    assert [(f.name, str(f.type)) for f in schema] == [
        ("position", "int64"), ("id", "string"), ("stage", "int32"), ("source", "string"),
        ("quadrant", "string"), ("n_tokens", "int64"), ("epoch", "int32")]


def test_sorted_reads_any_numeric_score_column(run):
    scores = pq.read_table(run.path("score/scores.parquet"))
    pq.write_table(scores.append_column("bpb_weak", pa.array(np.arange(scores.num_rows, 0, -1), pa.float64())),
                   run.path("score/scores.parquet"))
    partition_documents(PartitionConfig(), run)  # the labels belong to the file they were made for
    build(run, [{"kind": "sorted", "column": "bpb_weak"}])
    ids = order(run, "sorted").id
    assert ids.tolist() == sorted(ids, key=lambda i: -int(i[1:]))  # bpb_weak falls with the row number
    with pytest.raises(ConfigError, match="'column' = 'colour' is not a numeric column.*bpb_weak"):
        build(run, [{"kind": "sorted", "name": "bad", "column": "colour"}])


def test_order_written_in_many_row_groups_equals_one(run, monkeypatch):
    from framelm.schedule import build as build_module  # write_order reads WRITE_CHUNK_ROWS there

    build(run, [{"kind": "frame"}])
    whole = pq.read_table(run.path("schedule/frame/order.parquet"))
    monkeypatch.setattr(build_module, "WRITE_CHUNK_ROWS", 37)
    build(run, [{"kind": "frame", "name": "chunked"}])
    assert pq.ParquetFile(run.path("schedule/chunked/order.parquet")).metadata.num_row_groups > 10
    assert pq.read_table(run.path("schedule/chunked/order.parquet")).equals(whole)


def test_schedules_too_short_for_their_steps_or_repeating_data_are_warned_about(run, caplog):
    # one pass over the fixture's train documents is about 22k tokens: under one default step of 32 * 1024
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame"}])
    assert "less than one optimizer step of global_batch * seq_len = 32 * 1024" in caplog.text
    assert "schedule.total_tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "few"}], seq_len=128, global_batch=64)
    assert "whole optimizer steps of 8,192 tokens (global_batch * seq_len) for 4 stages" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "fine"}], seq_len=16, global_batch=4)
    assert "optimizer step" not in caplog.text and "repeated" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "many"}], seq_len=16, global_batch=4, total_tokens=200_000)
    assert "is repeated" in caplog.text and "schedule.max_epochs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "capped"}], seq_len=16, global_batch=4, total_tokens=200_000, max_epochs=20)
    assert "repeated" not in caplog.text and "total_tokens = " not in caplog.text
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "tiny"}], seq_len=4, global_batch=2, total_tokens=60)
    held = load_stages(run.path("schedule/tiny/stages.yaml"))["total_tokens"]
    assert abs(held - 60) > 3 and f"it holds {held:,} tokens for total_tokens = 60 (" in caplog.text


def test_a_window_too_small_for_its_documents_is_warned_about(caplog):
    from framelm.schedule import warn_about_thin_blends

    n = 100

    def stream_of(weight_a, weight_b):
        stages = [Stage("A", np.arange(n), np.zeros(n, np.int32), weight_a),
                  Stage("B", np.arange(n, 2 * n), np.zeros(n, np.int32), weight_b)]
        return assemble(stages, "logistic", window=0.1, steepness=10)

    even = np.full(n, 10, np.int64)  # half a window = 50 tokens: 5 documents a side
    assert stream_of(even, even).blends == [("A", "B", 5, 5)]
    long_last = even.copy()
    long_last[-1] = 400  # A's last document is longer than half the window: no blend at all
    stream = stream_of(long_last, even)
    assert stream.blends == [("A", "B", 0, 5)] and (stream.stage == np.repeat([0, 1], n)).all()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        warn_about_thin_blends("frame", stream, ScheduleConfig())
        assert "schedule frame: logistic transition window of transition_window = 0.1" in caplog.text
        assert "fewer than 4 whole documents on a side" in caplog.text and "A -> B (0 + 5 documents)" in caplog.text
        caplog.clear()
        warn_about_thin_blends("frame", stream_of(even, even), ScheduleConfig())
    assert caplog.text == ""


def test_a_selection_writes_only_its_cells_and_their_pool(run):
    build(run, [{"kind": "random"}, {"kind": "frame", "name": "low_ppl", "cells": ["Q1", "Q2"]}], transition="hard")
    whole, kept = order(run, "random"), order(run, "low_ppl")
    assert set(kept.quadrant) == {"Q1", "Q2"} and [s["name"] for s in load_stages(run.path("schedule/low_ppl/stages.yaml"))["stages"]] == ["Q1", "Q2"]
    # as many tokens as the schedule over every cell (up to each cell's last document), from half the documents
    assert abs(int((kept.n_tokens + 1).sum()) - int((whole.n_tokens + 1).sum())) < 2 * kept.n_tokens.max()
    low = whole[whole.quadrant.isin(["Q1", "Q2"])]
    sources = load_stages(run.path("schedule/low_ppl/stages.yaml"))["sources"]
    assert {s: v["pool_tokens"] for s, v in sources.items()} == (low.n_tokens + 1).groupby(low.source).sum().to_dict()
    assert set(kept.id) == set(low.id) and kept.epoch.max() >= 1  # every kept document, repeated to fill the budget
    assert load_stages(run.path("schedule/low_ppl/stages.yaml"))["cells"] == ["Q1", "Q2"]
    assert "cells" not in load_stages(run.path("schedule/random/stages.yaml"))  # every cell: the file reads as before
