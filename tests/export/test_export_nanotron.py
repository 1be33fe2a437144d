"""nanotron Nanoset folders and data_stages, read back by a reader written from datatrove's
.ds/.ds.index/.ds.metadata layout (the files Nanoset's DatatroveFolderDataset reads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from export_fixtures import build_tiny_run
from framelm.export import ExportConfig, export_schedules


def read_nanoset_folder(folder: Path):
    """All *.ds files of a folder in name order: tokens, document ends, and metadata lines."""
    files = sorted(folder.glob("*.ds"))
    assert files, f"no .ds files in {folder}"
    out = []
    for ds in files:
        tokenizer_and_size, n_tokens = ds.with_name(ds.name + ".metadata").read_text().split("\n")[:2]
        token_size = int(tokenizer_and_size.rsplit("|", 1)[1])
        tokens = np.fromfile(ds, dtype="<u2" if token_size == 2 else "<u4")
        assert len(tokens) == int(n_tokens)
        ends = np.fromfile(ds.with_name(ds.name + ".index"), dtype="<u8")
        out.append((tokens, ends, tokenizer_and_size))
    return out


def test_nanotron_folders_and_data_stages(tiny_run):
    export_schedules(ExportConfig(formats=["nanotron"], tokenizer_name="my-org/my-tokenizer"), tiny_run.run)
    out = tiny_run.run.path("export", "frame", "nanotron")
    phases = json.loads((out / "phases.json").read_text())["phases"]
    expected_docs = tiny_run.expected_docs()
    docs, stream = [], []
    for ph in phases:
        ((tokens, ends, header),) = read_nanoset_folder(out / ph["folder"])
        assert header == "my-org/my-tokenizer|2"
        assert ends[-1] == len(tokens) and len(ends) == ph["docs"]
        docs.extend(np.split(tokens, ends[:-1].astype(np.int64)))
        stream.append(tokens)
    np.testing.assert_array_equal(np.concatenate(stream), tiny_run.expected_stream())
    assert len(docs) == len(expected_docs)
    for got, want in zip(docs, expected_docs):
        np.testing.assert_array_equal(got, want)

    stages = yaml.safe_load((out / "data_stages.yaml").read_text())["data_stages"]
    steps = [s["start_training_step"] for s in stages]
    assert steps[0] == 1 and steps == sorted(set(steps))  # nanotron needs strictly increasing starts
    with_steps = [ph for ph in phases if ph["end_step"] > ph["start_step"]]
    assert [s["name"] for s in stages] == [ph["folder"] for ph in with_steps]
    assert steps == [ph["start_step"] + 1 for ph in with_steps]
    for s in stages:
        ds = s["data"]["dataset"]
        assert ds["dataset_folder"] == [str(out / s["name"])] and ds["dataset_weights"] == [1.0]
        assert ds["token_size_in_bytes"] == 2 and ds["vocab_size"] == 300


def test_nanotron_uint32_tokens(tmp_path):
    tiny = build_tiny_run(tmp_path / "run", vocab_size=70_000, n_docs=16)
    export_schedules(ExportConfig(formats=["nanotron"]), tiny.run)
    out = tiny.run.path("export", "frame", "nanotron")
    phases = json.loads((out / "phases.json").read_text())["phases"]
    tokens = [read_nanoset_folder(out / ph["folder"])[0] for ph in phases]
    assert all(t[2].endswith("|4") for t in tokens)
    np.testing.assert_array_equal(np.concatenate([t[0] for t in tokens]), tiny.expected_stream())


def test_segments_shorter_than_a_step_are_trained_merged(tmp_path):
    # 4 slices per transition window and 16 tokens per step: the last two slices of the second
    # window hold 10 and 9 tokens, and the second would get no step of its own
    tiny = build_tiny_run(tmp_path / "run")
    export_schedules(ExportConfig(formats=["nanotron", "megatron"], n_substages=4), tiny.run)
    export = tiny.run.path("export", "frame")
    segments = json.loads((export / "segments.json").read_text())["segments"]
    short = [s for s in segments if s["tokens"] < 16]
    assert [(s["name"], s["tokens"]) for s in short] == [("Q4_to_Q1_3of4", 10), ("Q4_to_Q1_4of4", 9)]
    for fmt in ("nanotron", "megatron"):
        info = json.loads((export / fmt / "phases.json").read_text())
        phases = info["phases"]
        assert all(ph["end_step"] > ph["start_step"] and ph["tokens"] >= 16 for ph in phases)
        assert [ph["start_token"] for ph in phases[1:]] == [ph["end_token"] for ph in phases[:-1]]
        merged = [ph for ph in phases if ph["kind"] == "merged"]
        assert [(ph["folder"], ph["first_doc"], ph["end_doc"], ph["tokens"]) for ph in merged] == [
            (f"{short[0]['index']:03d}_Q4_to_Q1_3of4_Q4_to_Q1_4of4", short[0]["first_doc"], short[1]["end_doc"], 19)]
        by_stage = {k: short[0]["mix"].get(k, 0) * 10 + short[1]["mix"].get(k, 0) * 9 for k in ("Q4", "Q1")}
        assert merged[0]["mix"] == pytest.approx({k: v / 19 for k, v in by_stage.items() if v}, abs=1e-6)
        # the other segments keep their folders, and every phase's files exist
        assert {ph["folder"] for ph in phases} == {s["folder"] for s in segments if s not in short} | {merged[0]["folder"]}
    ((tokens, ends, _),) = read_nanoset_folder(export / "nanotron" / merged[0]["folder"])
    np.testing.assert_array_equal(tokens, tiny.expected_stream()[merged[0]["start_token"]:merged[0]["end_token"]])
    assert len(ends) == merged[0]["docs"]
    phases = json.loads((export / "nanotron" / "phases.json").read_text())["phases"]
    stages = yaml.safe_load((export / "nanotron" / "data_stages.yaml").read_text())["data_stages"]
    assert [s["name"] for s in stages] == [ph["folder"] for ph in phases]  # every segment's documents are trained


def test_nanotron_refuses_a_stream_shorter_than_one_step(tmp_path):
    # nanotron's config asserts that some data stage starts at step 1: an empty data_stages fails there
    from framelm.errors import FramelmError

    tiny = build_tiny_run(tmp_path / "run")
    with pytest.raises(FramelmError, match="nanotron would get no data stage; lower export.global_batch"):
        export_schedules(ExportConfig(formats=["nanotron"], seq_len=1024, global_batch=32), tiny.run)
    assert not tiny.run.path("export", "frame", "nanotron", "data_stages.yaml").exists()


def test_nanotron_refuses_a_tokenizer_name_its_metadata_cannot_hold(tiny_run):
    # nanotron reads "<tokenizer>|<token bytes>" by splitting at "|" into exactly two fields
    from framelm.errors import FramelmError

    with pytest.raises(FramelmError, match=r"tokenizer name 'org\|name' holds '\|'"):
        export_schedules(ExportConfig(formats=["nanotron"], tokenizer_name="org|name"), tiny_run.run)
