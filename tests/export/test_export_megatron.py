"""Megatron indexed datasets, read back by a reader written from the .idx spec and by
Megatron-Core's own IndexedDataset where megatron-core is installed."""

from __future__ import annotations

import json
import logging
import re
import struct

import numpy as np
import pytest

from export_fixtures import STAGE_NAMES, build_tiny_run
from framelm.errors import FramelmError
from framelm.export import ExportConfig, export_schedules

DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def read_indexed_dataset(prefix):
    """Sequences of a Megatron MMIDIDX dataset: prefix.idx (header, lengths, pointers, doc indices) + prefix.bin."""
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    (code,) = struct.unpack("<B", raw[17:18])
    n_seq, n_doc = struct.unpack("<QQ", raw[18:34])
    assert version == 1
    pos = 34
    lengths = np.frombuffer(raw, "<i4", n_seq, pos)
    pointers = np.frombuffer(raw, "<i8", n_seq, pos + 4 * n_seq)
    doc_idx = np.frombuffer(raw, "<i8", n_doc, pos + 12 * n_seq)
    assert len(raw) == pos + 12 * n_seq + 8 * n_doc
    dtype = np.dtype(DTYPES[code])
    data = np.fromfile(f"{prefix}.bin", dtype=dtype)
    seqs = [data[p // dtype.itemsize: p // dtype.itemsize + n] for p, n in zip(pointers, lengths)]
    return seqs, doc_idx, dtype


def _phases(tiny):
    return json.loads(tiny.run.path("export", "frame", "megatron", "phases.json").read_text())


def test_megatron_datasets_hold_each_segment_documents_in_order(tiny_run):
    export_schedules(ExportConfig(formats=["megatron"], n_substages=2), tiny_run.run)
    out = tiny_run.run.path("export", "frame", "megatron")
    info = _phases(tiny_run)
    expected_docs = tiny_run.expected_docs()
    stage = tiny_run.order.column("stage").to_numpy()
    got_docs = []
    for ph in info["phases"]:
        seqs, doc_idx, dtype = read_indexed_dataset(out / ph["folder"])
        assert dtype == np.uint16
        np.testing.assert_array_equal(doc_idx, np.arange(len(seqs) + 1))  # one document per sequence
        assert len(seqs) == ph["docs"] == ph["end_doc"] - ph["first_doc"]
        labels = set(stage[ph["first_doc"]:ph["end_doc"]])
        if ph["kind"] == "stage":
            assert labels == {STAGE_NAMES.index(ph["name"])}
        got_docs.extend(seqs)
    assert len(got_docs) == len(expected_docs)
    for got, want in zip(got_docs, expected_docs):
        np.testing.assert_array_equal(got, want)
    # iterations: what one epoch of each segment feeds, (tokens - 1) // seq_len samples of
    # global_batch each with stages.yaml's 8 and 2, one phase after another
    assert (info["tokens_per_iteration"], info["seq_len"], info["global_batch"]) == (16, 8, 2)
    step = 0
    for ph in info["phases"]:
        assert (ph["start_step"], ph["end_step"]) == (step, step + (ph["tokens"] - 1) // 8 // 2)
        step = ph["end_step"]
    assert info["total_iterations"] == step
    stages = info["stages"]
    assert [(s["name"], s["start_token"], s["end_token"]) for s in stages] == tiny_run.stage_ranges
    assert stages[0]["start_step"] == 0 and stages[-1]["end_step"] == step
    for s in stages:  # a stage starts within the iterations of the phase its first token is in
        ph = next(p for p in info["phases"] if p["start_token"] <= s["start_token"] < p["end_token"])
        assert ph["start_step"] <= s["start_step"] <= ph["end_step"]
        assert s["start_step"] <= s["end_step"]
    # data_paths.txt: one --data-path line per segment, in order, after its iteration comment, each
    # with --split 100,0,0: Megatron's default split (969,30,1) would hold 3.1 % of it out of training
    text = (out / "data_paths.txt").read_text()
    paths = re.findall(r"^--data-path 1\.0 (\S+) --split 100,0,0$", text, re.M)
    assert paths == [str(out / ph["folder"]) for ph in info["phases"]]
    assert len(re.findall("^--data-path", text, re.M)) == len(paths) and "--split 100,0,0" in text.split("\n--")[0]
    assert info["split"] == "100,0,0"
    assert re.findall(r"iterations \[(\d+), (\d+)\)", text) == [(str(p["start_step"]), str(p["end_step"])) for p in info["phases"]]


def test_megatron_uses_int32_for_large_vocabularies(tmp_path):
    tiny = build_tiny_run(tmp_path / "run", vocab_size=100_000)
    export_schedules(ExportConfig(formats=["megatron"], seq_len=4, global_batch=1), tiny.run)
    out = tiny.run.path("export", "frame", "megatron")
    seqs = []
    for ph in _phases(tiny)["phases"]:
        s, _, dtype = read_indexed_dataset(out / ph["folder"])
        assert dtype == np.int32
        seqs.extend(s)
    np.testing.assert_array_equal(np.concatenate(seqs), tiny.expected_stream())


@pytest.mark.slow
def test_megatron_core_reads_the_datasets(tiny_run):
    pytest.importorskip("megatron.core", reason="megatron-core not installed (pip install megatron-core)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    export_schedules(ExportConfig(formats=["megatron"]), tiny_run.run)
    out = tiny_run.run.path("export", "frame", "megatron")
    got = []
    for ph in _phases(tiny_run)["phases"]:
        ds = IndexedDataset(str(out / ph["folder"]), mmap=True)
        assert len(ds) == ph["docs"]
        got.extend(np.array(ds[i]) for i in range(len(ds)))  # copies: the dataset unmaps on deletion
        np.testing.assert_array_equal(ds.document_indices, np.arange(len(ds) + 1))
    np.testing.assert_array_equal(np.concatenate(got), tiny_run.expected_stream())


def test_merged_segments_are_reported_once_per_trainer(tmp_path, caplog):
    # as test_segments_shorter_than_a_step_are_trained_merged: two slices shorter than a step merge;
    # each format asks for its merges twice (segments, then phases), and each trainer needs its own count
    tiny = build_tiny_run(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="framelm"):
        export_schedules(ExportConfig(formats=["nanotron", "megatron"], n_substages=4), tiny.run)
    merges = [m for m in caplog.messages if "merged segments" in m]
    assert len(merges) == len(set(merges))
    assert {t for t in ("Megatron", "nanotron") for m in merges if f"({t} needs" in m} == {"Megatron", "nanotron"}


def test_megatron_refuses_an_export_of_zero_iterations(tmp_path):
    tiny = build_tiny_run(tmp_path / "run")
    with pytest.raises(FramelmError, match="Megatron would train 0 iterations; lower export.global_batch"):
        export_schedules(ExportConfig(formats=["megatron"], seq_len=1024, global_batch=32), tiny.run)
