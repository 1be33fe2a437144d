"""Hostile input to `framelm ingest`: each case ends in a counted skip (recorded in
rejects.jsonl with file and line) or a clean error naming the file, line or key, and never in
a half-written output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .conftest import assert_nothing_half_written, assert_user_error, write_jsonl


def read_docs(run_dir: Path) -> list[dict]:
    parts = sorted((run_dir / "ingest" / "documents").glob("part-*.parquet"))
    return [row for p in parts for row in pq.read_table(p).to_pylist()]


def read_rejects(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "ingest" / "rejects.jsonl").read_text().splitlines()]


def ingest(framelm_cli, run_dir: Path, *inputs: Path, flags: tuple[str, ...] = ()):
    return framelm_cli("ingest", "--run-dir", run_dir, "--quiet", "--inputs", *map(str, inputs), *flags)


def test_mixed_bad_lines_are_counted_with_file_and_line(framelm_cli, tmp_path):
    src = write_jsonl(tmp_path / "web.jsonl", [
        {"id": "a", "text": "a good document"},
        '{"id": "b", "text": "unterminated',                  # line 2: invalid JSON
        b'{"id": "c", "text": "caf\xe9 in latin-1"}',         # line 3: not UTF-8
        {"id": "d", "content": "wrong field name"},            # line 4: no text field
        {"id": "e", "text": ""},                               # line 5: empty
        {"id": "f", "text": " \n\t  "},                        # line 6: whitespace only
        {"id": "g", "text": 42},                               # line 7: text is not a string
        '["a", "list"]',                                       # line 8: not an object
        {"id": "h", "text": "nul\x00inside and \u2028 separators"},  # kept verbatim
        {"id": "a", "text": "same id, another text"},          # line 10: duplicate id
        {"id": "i", "text": "a good document"},                # duplicate text: dropped by dedup
        {"id": ["x"], "text": "an id that is a list"},         # line 12: invalid id
    ])
    result = ingest(framelm_cli, tmp_path / "run", src)
    assert result.code == 0, result.err
    docs = read_docs(tmp_path / "run")
    assert [(d["id"], d["text"]) for d in docs] == [("a", "a good document"), ("h", "nul\x00inside and \u2028 separators")]
    rejects = read_rejects(tmp_path / "run")
    assert [(r["reason"], r["line"]) for r in rejects] == [
        ("invalid_json", 2), ("undecodable_bytes", 3), ("missing_text", 4), ("empty_text", 5), ("empty_text", 6),
        ("non_string_text", 7), ("invalid_json", 8), ("duplicate_id", 10), ("invalid_id", 12),
    ]
    assert all(r["file"] == str(src) for r in rejects)
    counts = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["ingest"]["counts"]
    assert counts["docs"] + counts["rejected"] + counts["duplicates_dropped"] == 12


def test_strict_stops_at_the_first_bad_line_naming_it(framelm_cli, tmp_path):
    src = write_jsonl(tmp_path / "web.jsonl", [{"id": "a", "text": "fine"}, "{not json"])
    result = ingest(framelm_cli, tmp_path / "run", src, flags=("--strict",))
    assert_user_error(result, f"{src}, line 2", "invalid_json")
    assert_nothing_half_written(tmp_path / "run", "ingest")


def test_only_wrong_field_names_is_an_error_naming_the_field(framelm_cli, tmp_path):
    src = write_jsonl(tmp_path / "web.jsonl", [{"id": str(i), "content": "x"} for i in range(3)])
    result = ingest(framelm_cli, tmp_path / "run", src)
    assert_user_error(result, "no usable documents", "text_field='text'", "missing_text")
    assert_nothing_half_written(tmp_path / "run", "ingest")


def test_truncated_gzip_names_the_file(framelm_cli, tmp_path):
    blob = gzip.compress(b"".join(json.dumps({"id": str(i), "text": f"document {i} " * 50}).encode() + b"\n" for i in range(400)))
    src = tmp_path / "web.jsonl.gz"
    src.write_bytes(blob[: len(blob) // 2])
    result = ingest(framelm_cli, tmp_path / "run", src, flags=("--docs-per-shard", "50"))
    assert_user_error(result, str(src), "truncated", "after line")
    assert_nothing_half_written(tmp_path / "run", "ingest")


def test_parquet_with_the_wrong_schema(framelm_cli, tmp_path):
    wrong_type = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": [1, 2]}), wrong_type)
    no_text = tmp_path / "body.parquet"
    pq.write_table(pa.table({"id": ["c"], "body": ["a text under another name"]}), no_text)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": ["d"], "text": ["kept"]}), good)
    result = ingest(framelm_cli, tmp_path / "run", wrong_type, no_text, good)
    assert result.code == 0, result.err
    assert [d["text"] for d in read_docs(tmp_path / "run")] == ["kept"]
    assert [(r["reason"], r["file"], r["line"]) for r in read_rejects(tmp_path / "run")] == [
        ("non_string_text", str(wrong_type), 1), ("non_string_text", str(wrong_type), 2), ("missing_text", str(no_text), 1)]


def test_parquet_without_the_text_column_names_its_columns(framelm_cli, tmp_path):
    src = tmp_path / "web.parquet"
    pq.write_table(pa.table({"url": ["u1", "u2"], "content": ["one", "two"]}), src)
    result = ingest(framelm_cli, tmp_path / "run", src)
    assert_user_error(result, "no usable documents", "'missing_text': 2", f"{src}, line 1: no 'text' column (columns: url, content)",
                      "text_field='text'")


def test_corrupt_parquet_data_names_the_file(framelm_cli, tmp_path):
    src = tmp_path / "web.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 50 for i in range(4000)]}), src, row_group_size=500, compression="snappy")
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4000] = bytes(4000)  # a data page zeroed: the footer still reads
    src.write_bytes(bytes(data))
    result = ingest(framelm_cli, tmp_path / "run", src, flags=("--docs-per-shard", "100"))
    assert_user_error(result, str(src), "corrupt or unreadable after row")
    assert_nothing_half_written(tmp_path / "run", "ingest")


def test_utf16_json_lines_are_refused_naming_the_encoding(framelm_cli, tmp_path):
    src = tmp_path / "web.jsonl"
    src.write_bytes('{"id": "a", "text": "saved by PowerShell"}\r\n'.encode("utf-16"))
    result = ingest(framelm_cli, tmp_path / "run", src)
    assert_user_error(result, str(src), "UTF-16", "UTF-8")
    assert_nothing_half_written(tmp_path / "run", "ingest")


def test_records_that_break_the_json_parser_or_unicode_are_counted(framelm_cli, tmp_path):
    src = write_jsonl(tmp_path / "web.jsonl", [
        {"id": "a", "text": "a good document"},
        '{"id": "b", "text": ' + "[" * 100_000 + "]" * 100_000 + "}",  # line 2: nested too deep
        '{"id": ' + "9" * 5000 + ', "text": "an id of 5000 digits"}',  # line 3: beyond int parsing limit
        '{"id": "c\\ud800", "text": "a lone surrogate in the id"}',   # line 4
        '{"id": "d", "text": "one in the source", "src": "w\\udc00"}',  # line 5
        '{"id": "e", "t\\ud800xt": "one in a key"}',                  # line 6: missing text
    ])
    result = ingest(framelm_cli, tmp_path / "run", src, flags=("--source-field", "src"))
    assert result.code == 0, result.err
    assert [d["id"] for d in read_docs(tmp_path / "run")] == ["a"]
    rejects = read_rejects(tmp_path / "run")
    assert [(r["reason"], r["line"]) for r in rejects] == [
        ("invalid_json", 2), ("invalid_json", 3), ("undecodable_bytes", 4), ("undecodable_bytes", 5), ("missing_text", 6)]
    assert "t\\ud800xt" in rejects[-1]["detail"]


def test_a_file_that_only_claims_to_be_parquet(framelm_cli, tmp_path):
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 this is not parquet at all")
    result = ingest(framelm_cli, tmp_path / "run", fake)
    assert_user_error(result, str(fake), "not a readable Parquet file")
    assert_nothing_half_written(tmp_path / "run", "ingest")


@pytest.mark.parametrize("argv, fragments", [
    (("--set", "txet_field=body"), ("unknown key 'ingest.txet_field'", "did you mean 'text_field'")),
    (("--docs-per-shard", "-5"), ("docs_per_shard", "-5")),
    (("--heldout-fraction", "0.7", "--ref-fraction", "0.4"), ("heldout_fraction", "ref_fraction")),
    (("--set", "dedup=maybe"), ("ingest.dedup", "true or false", "maybe")),
])
def test_bad_configuration_names_the_key(framelm_cli, tmp_path, argv, fragments):
    src = write_jsonl(tmp_path / "web.jsonl", [{"id": "a", "text": "fine"}])
    result = ingest(framelm_cli, tmp_path / "run", src, flags=argv)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "run" / "ingest").exists(), "a bad config must be refused before anything is written"


def test_missing_input_and_unknown_format(framelm_cli, tmp_path):
    assert_user_error(ingest(framelm_cli, tmp_path / "run", tmp_path / "nowhere.jsonl"), "nowhere.jsonl", "matches no file")
    odd = tmp_path / "corpus.docx"
    odd.write_bytes(b"PK\x03\x04")
    assert_user_error(ingest(framelm_cli, tmp_path / "run", odd), str(odd), "unknown format")


def test_run_dir_that_cannot_be_created(framelm_cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    src = write_jsonl(tmp_path / "web.jsonl", [{"id": "a", "text": "fine"}])
    assert_user_error(ingest(framelm_cli, blocker / "run", src), "cannot create run directory", str(blocker / "run"))
