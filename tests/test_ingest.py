import gzip
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framelm.errors import FramelmError
from framelm.ingest import DOCUMENT_SCHEMA, IngestConfig, file_stem, in_sample, split_of
from framelm.pipeline import run_stage
from framelm.rundir import RunDir

RECORDS = [
    {"id": "a", "text": "The cat sat on the mat.", "meta": {"x": 1}},
    {"id": "b", "text": "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich."},
    {"id": "c", "text": "def f(x):\n    return x + 1\n"},
]


def write_jsonl(path: Path, rows: list, opener=open) -> Path:
    with opener(path, "wb") as fh:
        for r in rows:
            fh.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return path


def ingest(tmp_path: Path, inputs: list, run_name: str = "run", **kw) -> tuple[dict, RunDir]:
    run = RunDir(tmp_path / run_name)
    counts = run_stage("ingest", IngestConfig(inputs=[str(i) for i in inputs], **kw), run)
    return counts, run


def documents(run: RunDir) -> list[dict]:
    parts = sorted(run.path("ingest", "documents").glob("part-*.parquet"))
    return [row for p in parts for row in pq.read_table(p).to_pylist()]


def test_file_stem():
    assert file_stem(Path("x/web.jsonl.gz")) == "web"
    assert file_stem(Path("web.parquet")) == "web"
    assert file_stem(Path("a.b.jsonl.zst")) == "a.b"


def test_every_file_format_gives_the_same_documents(tmp_path):
    import datasets
    import zstandard

    write_jsonl(tmp_path / "plain.jsonl", RECORDS)
    write_jsonl(tmp_path / "gz.jsonl.gz", RECORDS, gzip.open)
    (tmp_path / "zst.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "plain.jsonl").read_bytes()))
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("id", "text")} for r in RECORDS]), tmp_path / "pq.parquet")
    datasets.Dataset.from_list([{k: r[k] for k in ("id", "text")} for r in RECORDS]).save_to_disk(str(tmp_path / "hfds"))
    for name in ("plain.jsonl", "gz.jsonl.gz", "zst.jsonl.zst", "pq.parquet", "hfds"):
        counts, run = ingest(tmp_path, [tmp_path / name], run_name=f"run-{name}", dedup=False)
        docs = documents(run)
        assert [(d["id"], d["text"]) for d in docs] == [(r["id"], r["text"]) for r in RECORDS], name
        assert {d["source"] for d in docs} == {file_stem(Path(name))}
        assert counts["docs"] == 3 and counts["rejected"] == 0
        assert counts["chars"] == sum(len(r["text"]) for r in RECORDS)
        assert counts["bytes"] == sum(len(r["text"].encode()) for r in RECORDS)
        assert [d["n_bytes"] for d in docs] == [len(r["text"].encode()) for r in RECORDS]
        assert pq.read_schema(sorted(run.path("ingest", "documents").glob("*.parquet"))[0]).equals(DOCUMENT_SCHEMA, check_metadata=False)


def test_datasetdict_glob_and_text_directory(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "one"}]),
                               "test": datasets.Dataset.from_list([{"text": "two"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    texts = tmp_path / "notes"
    (texts / "sub").mkdir(parents=True)
    (texts / "b.txt").write_text("bee text")
    (texts / "a.txt").write_text("ay text")
    (texts / "sub" / "c.txt").write_text("sea text")
    (texts / "bad.txt").write_bytes(b"\xff\xfe not utf8")
    write_jsonl(tmp_path / "x1.jsonl", [{"text": "x one"}])
    write_jsonl(tmp_path / "x2.jsonl", [{"text": "x two"}])
    counts, run = ingest(tmp_path, [tmp_path / "dd", texts, tmp_path / "x*.jsonl"])
    docs = documents(run)
    # DatasetDict splits in sorted order (test, train); text files sorted by path; glob matches sorted
    assert [d["text"] for d in docs] == ["two", "one", "ay text", "bee text", "sea text", "x one", "x two"]
    assert [d["source"] for d in docs] == ["dd", "dd", "notes", "notes", "notes", "x1", "x2"]
    assert docs[2]["id"] == hashlib.sha1(b"ay text").hexdigest()
    assert counts["rejects"] == {"undecodable_bytes": 1}
    assert counts["sources"] == {"dd": 2, "notes": 3, "x1": 1, "x2": 1}
    assert len(counts["inputs"]) == 4 and all(len(fp["sha256"]) == 64 for fp in counts["inputs"])


def test_builtin_input(tmp_path):
    counts, run = ingest(tmp_path, ["builtin"], builtin_max_chars=60_000)
    assert set(counts["sources"]) == {"code", "docstring", "license"}
    assert 0 < counts["chars"] <= 60_000
    assert counts["inputs"][0]["path"] == "builtin"


BAD_LINES = [
    json.dumps({"id": "ok1", "text": "fine"}).encode(),  # 1
    b'{"id": "x", "text": ',  # 2 invalid_json
    b"[1, 2]",  # 3 invalid_json (not an object)
    json.dumps({"id": "m"}).encode(),  # 4 missing_text
    json.dumps({"id": "n", "text": 5}).encode(),  # 5 non_string_text
    b'{"id": "u", "text": "caf\xe9"}',  # 6 undecodable_bytes
    json.dumps({"id": "e", "text": "  \n\t"}).encode(),  # 7 empty_text
    json.dumps({"id": "ok1", "text": "another text"}).encode(),  # 8 duplicate_id
    json.dumps({"id": ["l"], "text": "list id"}).encode(),  # 9 invalid_id
    b'{"id": "s", "text": "lone \\ud800 surrogate"}',  # 10 undecodable_bytes
    b"",  # 11 blank line: not a record
    json.dumps({"id": "ok2", "text": "fine too", "src": 3}).encode(),  # 12 ok (source_field not set)
]


def test_every_bad_record_reason_is_counted_with_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    counts, run = ingest(tmp_path, [bad])
    written = sorted(str(p.relative_to(run.path("ingest"))) for p in run.path("ingest").rglob("*") if p.is_file())
    assert written == [".framelm-hash", "documents/.part-00000.parquet.done", "documents/part-00000.parquet",
                       "plan.json", "rejects.jsonl"]
    assert counts["rejects"] == {"invalid_json": 2, "missing_text": 1, "non_string_text": 1, "undecodable_bytes": 2,
                                 "empty_text": 1, "duplicate_id": 1, "invalid_id": 1}
    assert counts["docs"] == 2 and counts["rejected"] == 9
    rejects = [json.loads(line) for line in run.path("ingest", "rejects.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["line"]) for r in rejects] == [
        ("invalid_json", 2), ("invalid_json", 3), ("missing_text", 4), ("non_string_text", 5), ("undecodable_bytes", 6),
        ("empty_text", 7), ("duplicate_id", 8), ("invalid_id", 9), ("undecodable_bytes", 10)]
    assert all(r["file"] == str(bad) and r["detail"] for r in rejects)


def test_source_field(tmp_path):
    rows = [{"text": "a", "src": "web"}, {"text": "b"}, {"text": "c", "src": 7}]
    counts, run = ingest(tmp_path, [write_jsonl(tmp_path / "mix.jsonl", rows)], source_field="src")
    assert [d["source"] for d in documents(run)] == ["web", "mix"]
    assert counts["rejects"] == {"non_string_source": 1}


def test_strict_names_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(FramelmError, match=r"bad\.jsonl, line 2: bad record \(invalid_json\)"):
        ingest(tmp_path, [bad], strict=True)


def test_dedup_and_ids(tmp_path):
    rows = [{"text": "same"}, {"text": "same"}, {"id": "k", "text": "other"}, {"id": "k2", "text": "other"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    counts, run = ingest(tmp_path, [path], run_name="dedup")
    assert counts["docs"] == 2 and counts["duplicates_dropped"] == 2
    assert [d["id"] for d in documents(run)] == [hashlib.sha1(b"same").hexdigest(), "k"]

    counts, run = ingest(tmp_path, [path], run_name="nodedup", dedup=False)
    sha = hashlib.sha1(b"same").hexdigest()
    assert counts["docs"] == 4 and counts["duplicates_dropped"] == 0
    assert [d["id"] for d in documents(run)] == [sha, f"{sha}-2", "k", "k2"]  # ids stay unique


def test_split_is_a_stable_function_of_the_id(tmp_path):
    ids = [f"doc-{i}" for i in range(20000)]
    splits = [split_of(i, 0, 0.02, 0.05) for i in ids]
    assert abs(splits.count("heldout") / len(ids) - 0.02) < 0.005
    assert abs(splits.count("ref") / len(ids) - 0.05) < 0.008
    assert splits == [split_of(i, 0, 0.02, 0.05) for i in ids]
    assert splits != [split_of(i, 1, 0.02, 0.05) for i in ids]
    # a document's split does not depend on which other documents are ingested with it
    rows = [{"id": i, "text": f"text {i}"} for i in ids[:300]]
    _, run_all = ingest(tmp_path, [write_jsonl(tmp_path / "all.jsonl", rows)], run_name="all")
    _, run_some = ingest(tmp_path, [write_jsonl(tmp_path / "some.jsonl", rows[::7])], run_name="some")
    all_splits = {d["id"]: d["split"] for d in documents(run_all)}
    assert {d["id"]: d["split"] for d in documents(run_some)}.items() <= all_splits.items()
    assert set(all_splits.values()) == {"train", "ref", "heldout"}


def test_truncated_gzip_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl.gz", [{"text": f"line {i} " * 20} for i in range(2000)], gzip.open)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FramelmError, match=r"t\.jsonl\.gz: truncated, corrupt or unreadable"):
        ingest(tmp_path, [path])


def test_truncated_zstd_is_an_error_not_a_shorter_corpus(tmp_path):
    import zstandard

    rows = b"".join(json.dumps({"text": f"line {i} " * 20}).encode() + b"\n" for i in range(2000))
    whole = zstandard.ZstdCompressor().compress(rows)
    # two frames (as `cat a.zst b.zst` or a parallel compressor writes) are one file
    (tmp_path / "two.jsonl.zst").write_bytes(whole + zstandard.ZstdCompressor().compress(b'{"text": "second frame"}\n'))
    counts, _ = ingest(tmp_path, [tmp_path / "two.jsonl.zst"])
    assert counts["docs"] == 2001
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(FramelmError, match=r"t\.jsonl\.zst: truncated, corrupt or unreadable after line \d+ \(the file ends inside a zstd frame\)"):
        ingest(tmp_path, [path], run_name="truncated")


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    bom = b"\xef\xbb\xbf"
    jsonl = tmp_path / "windows.jsonl"
    jsonl.write_bytes(bom + b'{"id": "a", "text": "first"}\r\n{"id": "b", "text": "second"}\r\n')
    texts = tmp_path / "notes"
    texts.mkdir()
    (texts / "note.txt").write_bytes(bom + b"written by Notepad\r\n")
    counts, run = ingest(tmp_path, [jsonl, texts])
    assert counts["rejected"] == 0
    assert [(d["id"], d["text"]) for d in documents(run)] == [
        ("a", "first"), ("b", "second"), (hashlib.sha1(b"written by Notepad\r\n").hexdigest(), "written by Notepad\r\n")]


def test_input_names_with_glob_characters_or_not_utf8(tmp_path):
    folder = tmp_path / "corpus [v2]"
    folder.mkdir()
    write_jsonl(folder / "web.jsonl", [{"text": "in a bracketed folder"}])
    counts, _ = ingest(tmp_path, [folder], run_name="brackets")
    assert counts["sources"] == {"web": 1}
    # a Latin-1 file name, as old archives have: its stem is the source, so it must be writable
    latin1 = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jsonl"))
    write_jsonl(latin1, [{"text": "named in latin-1"}, {"body": "no text"}])
    counts, run = ingest(tmp_path, [latin1], run_name="latin1")
    assert counts["sources"] == {"caf\\udce9": 1} and [d["source"] for d in documents(run)] == ["caf\\udce9"]
    assert json.loads(run.path("ingest", "rejects.jsonl").read_text())["file"].endswith("caf\\udce9.jsonl")


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(FramelmError, match="matches no file"):
        ingest(tmp_path, [tmp_path / "nope*.jsonl"])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(FramelmError, match="unknown format"):
        ingest(tmp_path, [tmp_path / "data.csv"])
    with pytest.raises(FramelmError, match="no usable documents"):
        ingest(tmp_path, [write_jsonl(tmp_path / "e.jsonl", [{"body": "x"}])])


def test_rerun_with_same_config_does_no_work(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    first, run = ingest(tmp_path, [path])
    part = run.path("ingest", "documents", "part-00000.parquet")
    mtime = part.stat().st_mtime_ns
    second, _ = ingest(tmp_path, [path])
    assert second == first and part.stat().st_mtime_ns == mtime
    write_jsonl(path, RECORDS[:2])  # same path and config, other content: ingest runs again
    third, _ = ingest(tmp_path, [path])
    assert third["docs"] == 2


def test_resume_after_sigkill_is_byte_identical(tmp_path):
    rows = [{"id": f"d{i}", "text": f"document number {i} " * (1 + i % 7)} for i in range(120)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    _, clean = ingest(tmp_path, [path], run_name="clean", docs_per_shard=1)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "framelm", "ingest", "--run-dir", str(killed), "--inputs", str(path),
           "--docs-per-shard", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    docs_dir = killed / "ingest" / "documents"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and len(list(docs_dir.glob("*.done"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(docs_dir.glob("*.done")))
    assert 0 < finished < 120, "the subprocess was not killed mid-run"
    assert RunDir(killed).record("ingest")["status"] == "running"

    ingest(tmp_path, [path], run_name="killed", docs_per_shard=1)
    clean_files = sorted(p.name for p in clean.path("ingest", "documents").iterdir())
    assert sorted(p.name for p in docs_dir.iterdir()) == clean_files
    for name in clean_files:
        assert (docs_dir / name).read_bytes() == clean.path("ingest", "documents", name).read_bytes(), name


@pytest.mark.slow
def test_shared_corpus_file(shared_data, tmp_path):
    counts, run = ingest(tmp_path, [shared_data / "corpus" / "web.jsonl.gz"])
    assert counts["sources"] == {"web": counts["docs"]}
    assert counts["docs"] + counts["rejected"] + counts["duplicates_dropped"] == 1000
    assert counts["chars"] > 2_000_000
    assert sum(counts["splits"].values()) == counts["docs"]
    assert len(documents(run)) == counts["docs"]


@given(st.lists(st.integers(min_value=1, max_value=3 << 20), min_size=1, max_size=1500))
@settings(max_examples=50, deadline=None)
def test_row_group_bounds_cover_every_row_within_limits(n_bytes):
    from framelm.ingest import BYTES_PER_GROUP, ROWS_PER_GROUP, row_group_bounds

    starts = row_group_bounds(n_bytes)
    ends = starts[1:] + [len(n_bytes)]
    assert starts[0] == 0 and all(a < b for a, b in zip(starts, ends))
    for a, b in zip(starts, ends):
        assert b - a <= ROWS_PER_GROUP
        assert b - a == 1 or sum(n_bytes[a:b]) <= BYTES_PER_GROUP


def test_row_groups_are_bounded_by_rows_and_bytes(tmp_path):
    from framelm.ingest import BYTES_PER_GROUP, ROWS_PER_GROUP, row_group_bounds

    assert row_group_bounds([1] * (2 * ROWS_PER_GROUP + 5)) == [0, ROWS_PER_GROUP, 2 * ROWS_PER_GROUP]
    assert row_group_bounds([BYTES_PER_GROUP + 1, 1, 1, BYTES_PER_GROUP]) == [0, 1, 3]
    big = "x" * (BYTES_PER_GROUP // 2)
    rows = [{"id": str(i), "text": big + str(i)} for i in range(5)]
    _, run = ingest(tmp_path, [write_jsonl(tmp_path / "big.jsonl", rows)])
    meta = pq.ParquetFile(run.path("ingest", "documents", "part-00000.parquet")).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [1, 1, 1, 1, 1]


def test_directory_of_record_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": "from jsonl"}])
    pq.write_table(pa.table({"text": ["from parquet"]}), folder / "a.parquet")
    counts, run = ingest(tmp_path, [folder])
    assert [(d["text"], d["source"]) for d in documents(run)] == [("from parquet", "a"), ("from jsonl", "b")]


def test_directory_mixing_text_and_record_files_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "web.jsonl", [{"text": f"record {i}"} for i in range(5)])
    (folder / "README.txt").write_text("about this folder")
    with pytest.raises(FramelmError, match=r"mixed: mixes \.txt files \(e\.g\. README\.txt\) with .*web\.jsonl"):
        ingest(tmp_path, [folder])


def test_an_edit_anywhere_in_an_input_reruns_ingest(tmp_path):
    # A same-size edit past the first MiB, where a fingerprint of the file's ends sees nothing.
    rows = [{"id": f"d{i}", "text": f"document {i:06d} " + "x" * 80} for i in range(16_000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    assert path.stat().st_size > 1 << 20
    ingest(tmp_path, [path])
    path.write_bytes(path.read_bytes().replace(b"document 012000 ", b"document EDITED "))
    counts, run = ingest(tmp_path, [path])
    assert "document EDITED " + "x" * 80 in {d["text"] for d in documents(run)}


def test_ingest_without_inputs_says_it_reads_the_demo_corpus(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="framelm"):
        counts = run_stage("ingest", IngestConfig(builtin_max_chars=20_000), RunDir(tmp_path / "default"))
    assert counts["docs"] > 0
    assert "ingesting the built-in demo corpus" in caplog.text and "the default when no --inputs are given" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [write_jsonl(tmp_path / "c.jsonl", [{"text": "own data"}])], run_name="own")
    assert "demo corpus" not in caplog.text


def test_source_field_missing_from_records_is_warned_about(tmp_path, caplog):
    rows = [{"text": f"doc {i}", "src": "web"} for i in range(3)] + [{"text": "no source"}]
    data = write_jsonl(tmp_path / "mix.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [data], run_name="some", source_field="src")
    assert "source_field 'src' is missing or empty in 1 of 4 records" in caplog.text and str(data) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        counts, _ = ingest(tmp_path, [data], run_name="typo", source_field="sourc")
    assert counts["sources"] == {"mix": 4}
    assert "source_field 'sourc' is missing or empty in all 4 records" in caplog.text
    assert "misspelt" in caplog.text and "keys: text, src" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [data], run_name="unset")
    # the quote: this test's tmp path, named in the warning about ids, contains "source_field"
    assert "source_field '" not in caplog.text


def test_tiny_heldout_and_ref_splits_are_warned_about(tmp_path, caplog):
    rows = [{"text": f"document number {i}"} for i in range(400)]
    data = write_jsonl(tmp_path / "docs.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="framelm"):
        counts, _ = ingest(tmp_path, [data], run_name="small", heldout_fraction=0.02, ref_fraction=0.3)
    assert counts["splits"]["heldout"] < 50 <= counts["splits"]["ref"]
    assert "'heldout' split has only" in caplog.text and "heldout_fraction=0.02" in caplog.text
    assert "'ref' split" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [data], run_name="large", heldout_fraction=0.3, ref_fraction=0.3)
    assert "split has only" not in caplog.text


def test_the_documents_folder_reads_as_one_dataset(tmp_path):
    """Shard markers are hidden, so pyarrow (and pandas, DuckDB) read the folder as a dataset."""
    rows = [{"text": f"document number {i} " * 3} for i in range(30)]
    counts, run = ingest(tmp_path, [write_jsonl(tmp_path / "c.jsonl", rows)], docs_per_shard=10)
    table = pq.read_table(run.path("ingest", "documents"))
    assert table.num_rows == counts["docs"] == 30
    assert len(list(run.path("ingest", "documents").glob("part-*.parquet"))) == 3


def test_max_docs_per_input_keeps_the_first_usable_documents_of_each_file(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": f"doc a{i}"} for i in range(10)])
    # a bad record and a duplicate are not documents, so they do not count towards the cap
    b = write_jsonl(tmp_path / "b.jsonl", [b"{not json", {"id": "b0", "text": "doc a0"}]
                    + [{"id": f"b{i}", "text": f"doc b{i}"} for i in range(1, 10)])
    counts, run = ingest(tmp_path, [a, b], max_docs_per_input=3)
    assert [d["id"] for d in documents(run)] == ["a0", "a1", "a2", "b1", "b2", "b3"]
    assert counts["sources"] == {"a": 3, "b": 3} and counts["rejected"] == 1 and counts["duplicates_dropped"] == 1
    counts, run = ingest(tmp_path, [a, b], run_name="all")
    assert counts["docs"] == 19
    with pytest.raises(Exception, match="'max_docs_per_input' = -1 must be 0"):
        IngestConfig(inputs=[str(a)], max_docs_per_input=-1).validate()


def test_sample_fraction_keeps_exactly_the_full_runs_documents_that_fall_in_the_sample(tmp_path):
    rows = [{"id": f"d{i}", "text": f"doc {i}"} for i in range(2000)] + [{"id": "dup", "text": "doc 7"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    full, full_run = ingest(tmp_path, [path], run_name="full", heldout_fraction=0.1, ref_fraction=0.1)
    counts, run = ingest(tmp_path, [path], run_name="sample", sample_fraction=0.25, heldout_fraction=0.1, ref_fraction=0.1)
    everything = {d["id"]: d for d in documents(full_run)}
    sample = documents(run)
    # the sample is a subset of the full run with the same splits, drawn after dedup
    assert sample == [everything[d["id"]] for d in sample]
    assert [d["id"] for d in sample] == [i for i in everything if in_sample(i, 0, 0.25)]
    assert 400 < counts["docs"] < 600 and counts["sampled_out"] == full["docs"] - counts["docs"]
    assert counts["duplicates_dropped"] == 1
    # independent of the split hash: the sample keeps the splits' proportions
    assert 0.05 < counts["splits"]["heldout"] / counts["docs"] < 0.15
    assert 0.72 < counts["splits"]["train"] / counts["docs"] < 0.88
    _, other = ingest(tmp_path, [path], run_name="seed1", sample_fraction=0.25, sample_seed=1)
    assert {d["id"] for d in documents(other)} != {d["id"] for d in sample}
    with pytest.raises(FramelmError, match="none of the 3 usable documents .* fell in the sample_fraction = 1e-09 sample"):
        ingest(tmp_path, [write_jsonl(tmp_path / "b.jsonl", rows[:3])], run_name="none", sample_fraction=1e-9)
    # no sample hashes as before sample_fraction existed, so older run directories stay up to date
    assert "sample_seed" not in IngestConfig(sample_seed=3).hashed_dict()
    assert IngestConfig().config_hash() == "15e3aea8c31e4c12"  # the default's hash before sampling existed
    assert IngestConfig(sample_fraction=0.5).hashed_dict()["sample_seed"] == 0
    with pytest.raises(Exception, match="'sample_fraction' = 0 must be in \\(0, 1\\]"):
        IngestConfig(inputs=[str(path)], sample_fraction=0).validate()


def test_an_input_that_the_sample_leaves_empty_is_warned_about_as_such(tmp_path, caplog):
    big = write_jsonl(tmp_path / "big.jsonl", [{"id": f"d{i}", "text": f"doc {i}"} for i in range(400)])
    kept_out = next(f"x{i}" for i in range(1000) if not in_sample(f"x{i}", 0, 0.1))
    small = write_jsonl(tmp_path / "small.jsonl", [{"id": kept_out, "text": "alone"}])
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [big, small], sample_fraction=0.1)
    assert (f"input {small} yielded no documents: none of its 1 usable documents fell in the sample_fraction = 0.1 "
            "sample") in caplog.text


def test_an_input_that_yields_no_documents_is_warned_about_by_name(tmp_path, caplog):
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS)
    web = write_jsonl(tmp_path / "web_content.jsonl", [{"id": f"w{i}", "content": f"page {i}"} for i in range(5)])
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    folder = tmp_path / "folder"
    folder.mkdir()
    table = pa.table({"doc_id": ["p1", "p2"], "body": ["x", "y"]})
    pq.write_table(table, folder / "cols.parquet")
    again = write_jsonl(tmp_path / "again.jsonl", [RECORDS[0]])
    with caplog.at_level(logging.WARNING, logger="framelm"):
        counts, _ = ingest(tmp_path, [good, web, empty, folder, again], dedup=True)
    assert counts["docs"] == 3 and counts["rejects"] == {"missing_text": 7}
    assert (f"input {web} yielded no documents: all 5 of its records were rejected or dropped: missing_text=5 "
            "(the first: no 'text' field (keys: id, content)); check text_field='text'") in caplog.text
    assert "or leave the file out of the inputs" in caplog.text
    assert f"input {empty} yielded no documents: it holds no records" in caplog.text
    # a folder is read as its files, so the file is named, with its columns
    assert (f"input {folder / 'cols.parquet'} yielded no documents: all 2 of its records were rejected or dropped: "
            "missing_text=2 (the first: no 'text' column (columns: doc_id, body))") in caplog.text
    assert f"input {again} yielded no documents: all 1 of its records were rejected or dropped: duplicates_dropped=1" in caplog.text
    assert f"input {good} yielded" not in caplog.text


def test_an_id_field_missing_from_an_input_is_warned_about(tmp_path, caplog):
    uid = write_jsonl(tmp_path / "uid.jsonl", [{"uid": f"u{i}", "text": f"doc {i}"} for i in range(4)])
    other = write_jsonl(tmp_path / "other.jsonl", [{"uidx": "o1", "text": "other doc"}])
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [uid, other], run_name="typo", id_field="uidx")
    assert (f"id_field 'uidx' is in none of the 4 records of {uid}, so their ids are derived from text hashes (and "
            "their heldout/ref/train splits with them); is the field name misspelt? Its first record has the keys: "
            "uid, text") in caplog.text
    assert f"records of {other}" not in caplog.text and "default id_field" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [uid], run_name="right", id_field="uid")
    assert "id_field" not in caplog.text

    # the default 'id' absent from every record: warned once, naming the file's columns, not only those read
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc_id": ["d1", "d2"], "text": ["first", "second"]}), parquet)
    noid = write_jsonl(tmp_path / "noid.jsonl", [{"text": "no id here"}])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [parquet, noid], run_name="default")
    assert caplog.text.count("default id_field") == 1
    assert (f"no record has an 'id' field (the default id_field), so every document's id is derived from its text "
            "hash and the heldout/ref/train splits depend on the text; if the records carry ids under another key, "
            f"set id_field to it. The first record ({parquet}) has the keys: doc_id, text") in caplog.text
    # records without ids beside records with them are normal under the default
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [noid, write_jsonl(tmp_path / "ids.jsonl", RECORDS)], run_name="some")
    assert "id_field" not in caplog.text
    # nor are they in a folder of .txt files, whose documents have no fields to carry one
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a text document")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        ingest(tmp_path, [texts], run_name="from_texts")
    assert "id_field" not in caplog.text
