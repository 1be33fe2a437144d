"""The flat stream, the shared plan (segments, transition windows) and input validation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from export_fixtures import EOS, STAGE_NAMES, build_tiny_run
from framelm.config import ConfigError
from framelm.errors import FramelmError
from framelm.export import ExportConfig, export_schedules


def _export(tiny, **cfg):
    return export_schedules(ExportConfig.from_dict(cfg), tiny.run)


def test_stream_holds_scheduled_documents_in_order(tiny_run):
    counts = _export(tiny_run, chunk_tokens=7)  # tiny chunks: documents straddle chunk edges
    out = tiny_run.run.path("export", "frame", "stream")
    meta = json.loads((out / "meta.json").read_text())
    tokens = np.fromfile(out / "tokens.bin", dtype=meta["dtype"])
    expected = tiny_run.expected_stream()
    assert meta["dtype"] == "uint16" and meta["eos_id"] == EOS and meta["vocab_size"] == 300
    assert meta["n_tokens"] == len(expected) == counts["frame"]["tokens"]
    np.testing.assert_array_equal(tokens, expected)
    assert [(s["name"], s["start_token"], s["end_token"]) for s in meta["stages"]] == tiny_run.stage_ranges
    # every document ends in EOS, and the stream holds exactly one EOS per scheduled document
    assert int((tokens == EOS).sum()) == tiny_run.order.num_rows


def test_uint32_store_keeps_its_dtype(tmp_path):
    tiny = build_tiny_run(tmp_path / "run", vocab_size=70_000)
    _export(tiny)
    out = tiny.run.path("export", "frame", "stream")
    assert json.loads((out / "meta.json").read_text())["dtype"] == "uint32"
    tokens = np.fromfile(out / "tokens.bin", dtype="<u4")
    assert tokens.max() >= 65536  # the fixture really draws large ids
    np.testing.assert_array_equal(tokens, tiny.expected_stream())


def test_segments_cover_the_stream_with_pure_stages_and_transition_slices(tiny_run):
    _export(tiny_run, n_substages=3)
    seg = json.loads(tiny_run.run.path("export", "frame", "segments.json").read_text())["segments"]
    stage = tiny_run.order.column("stage").to_numpy()
    lengths = tiny_run.order.column("n_tokens").to_numpy() + 1
    starts = np.concatenate([[0], np.cumsum(lengths)])
    assert seg[0]["first_doc"] == 0 and seg[-1]["end_doc"] == len(stage)
    for a, b in zip(seg, seg[1:]):
        assert a["end_doc"] == b["first_doc"] and a["end_token"] == b["start_token"]
    for s in seg:
        labels = stage[s["first_doc"]:s["end_doc"]]
        assert s["start_token"] == starts[s["first_doc"]] and s["end_token"] == starts[s["end_doc"]]
        tok = {STAGE_NAMES[k]: lengths[s["first_doc"]:s["end_doc"]][labels == k].sum() for k in set(labels)}
        assert s["mix"] == pytest.approx({k: v / sum(tok.values()) for k, v in tok.items()}, abs=1e-6)
        if s["kind"] == "stage":
            assert len(set(labels)) == 1 and s["name"] == STAGE_NAMES[labels[0]]
    kinds = [s["kind"] for s in seg]
    assert kinds == ["stage"] + ["transition"] * 3 + ["stage"] + ["transition"] * 3 + ["stage"]
    # a transition window spans exactly the interleaved documents: from the first document of
    # the later stage to the last document of the earlier one
    for w, (lo, hi) in enumerate([(0, 1), (1, 2)]):
        window = seg[1 + 4 * w: 4 + 4 * w]
        assert window[0]["first_doc"] == int(np.flatnonzero(stage == hi)[0])
        assert window[-1]["end_doc"] == int(np.flatnonzero(stage == lo)[-1]) + 1
        assert {k for s in window for k in s["mix"]} == {STAGE_NAMES[lo], STAGE_NAMES[hi]}


def test_segments_shorter_than_a_step_merge_with_their_shorter_neighbour():
    from types import SimpleNamespace

    from framelm.export.plan import ExportPlan, Segment, StepRule
    from framelm.tokenstore import StageRange

    # one document per segment, of 20, 5, 3, 30 and 4 tokens; stage A then B; 10 tokens per step
    # (2 samples of 5 + 1 tokens sharing one, as Megatron's): a step needs 11 tokens
    length = np.array([20, 5, 3, 30, 4])
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    stage = np.array([0, 0, 1, 1, 1], np.int32)
    ends = np.append(start, length.sum())
    segments = [Segment(i, f"s{i}", "stage", i, i + 1, int(ends[i]), int(ends[i + 1]), {"AB"[stage[i]]: 1.0})
                for i in range(5)]
    plan = ExportPlan("t", None, SimpleNamespace(tokens=np.zeros(62)), {"offset": start, "length": length,
                      "start": start, "stage": stage}, [StageRange("A", 0, 25), StageRange("B", 25, 62)], {}, segments)
    # 3 joins its shorter neighbour 5 (-> 8), 4 joins 30 (-> 34), then 8 joins 20 (-> 28)
    rule = StepRule("t", 5, 2, overlapping=True)
    merged = plan.step_segments(rule)
    assert [(s.index, s.name, s.kind, s.first_doc, s.end_doc, s.start_token, s.end_token) for s in merged] == [
        (0, "s0+s2", "merged", 0, 3, 0, 28), (3, "s3+s4", "merged", 3, 5, 28, 62)]
    assert merged[0].mix == {"A": 0.892857, "B": 0.107143} and merged[1].mix == {"B": 1.0}
    assert merged[0].folder == "000_s0_s2"  # first and last part: short, however many parts
    # every segment gets the whole steps its own dataset feeds: 28 tokens hold (28 - 1) // 5 = 5
    # samples, 2 steps; 34 hold 6, 3 steps (its stream position [28, 62) spans 4 steps of 10)
    assert [(p["start_step"], p["end_step"], p["samples"]) for p in plan.phases(rule)] == [(0, 2, 5), (2, 5, 6)]
    # a stage boundary inside a phase maps onto its steps in proportion: token 25 of [0, 28) -> step 1
    assert [(s["start_step"], s["end_step"]) for s in plan.stage_steps(rule)] == [(0, 1), (1, 5)]
    # a step of one sample of 5 + 1 tokens: 5 tokens hold none, so 3 joins 5 (not 30), 4 joins 30
    assert [s.name for s in plan.step_segments(StepRule("t", 5, 1, overlapping=True))] == ["s0", "s1+s2", "s3+s4"]
    one = plan.step_segments(StepRule("t", 50, 2, overlapping=True))  # too short for a step in all
    assert len(one) == 1 and one[0].end_token == 62
    assert plan.step_segments(StepRule("t", 2, 1, overlapping=True)) == segments  # each feeds a step
    # disjoint samples (nanotron's): 2 samples of 4 + 1 tokens a step, so 10 tokens a step
    disjoint = StepRule("t", 4, 2, overlapping=False)
    assert [s.name for s in plan.step_segments(disjoint)] == ["s0+s2", "s3+s4"]
    assert [(p["start_step"], p["end_step"], p["samples"]) for p in plan.phases(disjoint)] == [(0, 2, 5), (2, 5, 6)]


def test_hard_switch_schedule_has_no_transitions(tmp_path):
    tiny = build_tiny_run(tmp_path / "run")
    order = tiny.order.sort_by([("stage", "ascending"), ("position", "ascending")])
    order = order.set_column(0, "position", pa.array(range(order.num_rows), pa.int64()))
    pq.write_table(order, tiny.run.path("schedule", "frame", "order.parquet"))
    lengths = order.column("n_tokens").to_numpy() + 1
    stage = order.column("stage").to_numpy()
    bounds = [0] + [int(lengths[stage < s].sum()) for s in (1, 2, 3)]
    stages_yaml = tiny.run.path("schedule", "frame", "stages.yaml")
    data = yaml.safe_load(stages_yaml.read_text())
    for s, st in enumerate(data["stages"]):
        st["start_token"], st["end_token"] = bounds[s], bounds[s + 1]
    stages_yaml.write_text(yaml.safe_dump(data))
    _export(tiny)
    seg = json.loads(tiny.run.path("export", "frame", "segments.json").read_text())["segments"]
    assert [(s["kind"], s["name"], s["start_token"]) for s in seg] == [("stage", n, bounds[i]) for i, n in enumerate(STAGE_NAMES)]


def test_config_validation_names_key_and_value():
    with pytest.raises(ConfigError, match="formats.*parquet"):
        ExportConfig.from_dict({"formats": ["parquet"]})
    with pytest.raises(ConfigError, match="n_substages"):
        ExportConfig.from_dict({"n_substages": 0})
    with pytest.raises(ConfigError, match="llmc_shard_tokens"):
        ExportConfig.from_dict({"llmc_shard_tokens": 2**31})


def test_stages_yaml_that_does_not_tile_the_stream_is_refused(tiny_run):
    path = tiny_run.run.path("schedule", "frame", "stages.yaml")
    data = yaml.safe_load(path.read_text())
    data["stages"][-1]["end_token"] += 5
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(FramelmError, match=r"stages.yaml.*end at token"):
        _export(tiny_run)


def test_unknown_document_id_is_named(tiny_run):
    path = tiny_run.run.path("schedule", "frame", "order.parquet")
    order = pq.read_table(path)
    ids = order.column("id").to_pylist()
    ids[7] = "no-such-doc"
    pq.write_table(order.set_column(1, "id", pa.array(ids)), path)
    with pytest.raises(FramelmError, match="position 7: id 'no-such-doc'"):
        _export(tiny_run)
    assert not tiny_run.run.path("export", "frame", "stream", "tokens.bin").exists()


def test_missing_schedule_is_a_clear_error(tiny_run):
    made = ", ".join(sorted(p.parent.name for p in tiny_run.run.root.glob("schedule/*/stages.yaml")))
    with pytest.raises(FramelmError, match=rf"there is no schedule 'no-such-schedule' in .*schedule \(it holds {made}\)"):
        _export(tiny_run, schedules=["no-such-schedule"])


def test_iteration_settings_are_required_for_megatron(tiny_run):
    path = tiny_run.run.path("schedule", "frame", "stages.yaml")
    data = yaml.safe_load(path.read_text())
    del data["seq_len"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="seq_len"):
        _export(tiny_run, formats=["megatron"])
    _export(tiny_run, formats=["megatron"], seq_len=8)  # the config can supply it


@pytest.mark.parametrize("loop_threshold", [0, 10**9], ids=["slice-per-document", "index-gather"])
def test_any_token_range_reads_the_same_as_the_stream(tiny_run, monkeypatch, loop_threshold):
    from framelm.export.plan import open_plan

    monkeypatch.setattr("framelm.export.plan.LOOP_MIN_MEAN_TOKENS", loop_threshold)
    plan = open_plan(tiny_run.run, "frame", n_substages=4)
    expected = tiny_run.expected_stream()
    rng = np.random.default_rng(1)
    for a, b in [(0, len(expected)), (0, 1), (len(expected) - 1, len(expected)), (5, 5)] + [
            tuple(sorted(rng.integers(0, len(expected) + 1, 2))) for _ in range(50)]:
        np.testing.assert_array_equal(plan.read(int(a), int(b)), expected[a:b])


def test_a_changed_order_is_exported_afresh(tiny_run):
    _export(tiny_run)
    before = tiny_run.run.path("export", "frame", "stream", "tokens.bin").read_bytes()
    path = tiny_run.run.path("schedule", "frame", "order.parquet")
    rows = tiny_run.order.to_pylist()
    rows[0]["id"], rows[1]["id"] = rows[1]["id"], rows[0]["id"]  # both in the first stage
    rows[0]["n_tokens"], rows[1]["n_tokens"] = rows[1]["n_tokens"], rows[0]["n_tokens"]
    tiny_run.order = pa.Table.from_pylist(rows, schema=tiny_run.order.schema)
    pq.write_table(tiny_run.order, path)
    _export(tiny_run)  # the stream's .done marker belongs to the old order: must not be trusted
    tokens = np.fromfile(tiny_run.run.path("export", "frame", "stream", "tokens.bin"), dtype=np.uint16)
    np.testing.assert_array_equal(tokens, tiny_run.expected_stream())
    assert tokens.tobytes() != before


def test_each_exported_stream_has_a_digest_that_follows_its_schedule(tiny_run):
    from framelm.export import stream_digest

    first = _export(tiny_run)["parts"]
    assert list(first) == ["frame"] and first["frame"] == stream_digest(tiny_run.run, "frame")
    assert _export(tiny_run, formats=["stream", "llmc"])["parts"] == first  # other formats: the same stream
    assert "parts" not in _export(tiny_run, formats=["llmc"])  # no stream, nothing to train on
    order = tiny_run.run.path("schedule", "frame", "order.parquet")
    table = pq.read_table(order)
    pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", table["id"].take(
        np.roll(np.arange(table.num_rows), 1))), order)  # another order of the same documents
    assert _export(tiny_run)["parts"]["frame"] != first["frame"]
