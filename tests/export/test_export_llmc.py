"""llm.c shards, read back with a reader written from llm.c's format description."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export_fixtures import build_tiny_run
from framelm.errors import FramelmError
from framelm.export import ExportConfig, export_schedules


def read_llmc_shard(path):
    """llm.c: 256 little-endian int32 header (magic 20240520, version 1, n_tokens), then uint16 tokens."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1
    tokens = np.frombuffer(raw[1024:], dtype="<u2")
    assert len(tokens) == header[2]
    return tokens


def test_llmc_shards_hold_the_stream_in_order(tiny_run):
    shard_tokens = 64
    export_schedules(ExportConfig(formats=["llmc"], llmc_shard_tokens=shard_tokens, chunk_tokens=10), tiny_run.run)
    out = tiny_run.run.path("export", "frame", "llmc")
    table = json.loads((out / "stages.json").read_text())
    shards = [read_llmc_shard(out / name) for name in table["shards"]]
    assert sorted(p.name for p in out.glob("*.bin")) == table["shards"]
    expected = tiny_run.expected_stream()
    assert len(expected) % shard_tokens  # the stream does not divide into whole shards
    assert len(shards) == -(-len(expected) // shard_tokens) > 1
    # near-equal shards: no short remainder, which llm.c's loader would refuse as under B * T + 1 tokens
    assert -(-shard_tokens // 2) <= min(map(len, shards)) and max(map(len, shards)) - min(map(len, shards)) <= 1
    assert table["shard_starts"] == np.cumsum([0] + [len(s) for s in shards[:-1]]).tolist()
    assert table["max_shard_tokens"] == shard_tokens and table["n_tokens"] == len(expected)
    stream = np.concatenate(shards)
    np.testing.assert_array_equal(stream, expected)
    # the boundary table points at each stage's first token and at its end
    for st, (name, start, end) in zip(table["stages"], tiny_run.stage_ranges):
        assert (st["name"], st["start_token"], st["end_token"]) == (name, start, end)
        assert table["shard_starts"][st["start"]["shard"]] + st["start"]["offset"] == start
        assert shards[st["start"]["shard"]][st["start"]["offset"]] == expected[start]
        assert table["shard_starts"][st["end"]["shard"]] + st["end"]["offset"] == end
    assert table["stages"][-1]["end"] == {"shard": len(shards) - 1, "offset": len(shards[-1])}  # the stream end
    assert len(table["transitions"]) == 2
    for w in table["transitions"]:
        assert table["shard_starts"][w["start"]["shard"]] + w["start"]["offset"] == w["start_token"] < w["end_token"]
        assert 0 <= w["start"]["offset"] < len(shards[w["start"]["shard"]])


def test_llmc_refuses_vocabularies_beyond_uint16(tmp_path):
    tiny = build_tiny_run(tmp_path / "run", vocab_size=65537)
    with pytest.raises(FramelmError, match="vocab_size is 65537"):
        export_schedules(ExportConfig(formats=["llmc"]), tiny.run)
    assert not list(tiny.run.path("export", "frame").glob("llmc/*.bin"))


def test_llmc_accepts_exactly_uint16_vocab(tmp_path):
    tiny = build_tiny_run(tmp_path / "run", vocab_size=65536, n_docs=12)
    export_schedules(ExportConfig(formats=["llmc"], llmc_shard_tokens=1000), tiny.run)
    shard = read_llmc_shard(tiny.run.path("export", "frame", "llmc", "train_000000.bin"))
    np.testing.assert_array_equal(shard, tiny.expected_stream())


def test_llmc_refuses_an_empty_schedule(tmp_path):
    # zero shards: llm.c's file pattern matches nothing, and stages.json would name a missing shard 0
    import pyarrow.parquet as pq
    import yaml

    tiny = build_tiny_run(tmp_path / "run")
    sched = tiny.run.path("schedule", "frame")
    pq.write_table(tiny.order.slice(0, 0), sched / "order.parquet")
    data = yaml.safe_load((sched / "stages.yaml").read_text())
    for st in data["stages"]:
        st["start_token"] = st["end_token"] = 0
    (sched / "stages.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(FramelmError, match="llmc: the schedule holds no tokens"):
        export_schedules(ExportConfig(formats=["llmc"]), tiny.run)
    assert not tiny.run.path("export", "frame", "llmc", "stages.json").exists()
