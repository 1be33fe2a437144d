"""Property: for any mix of valid and broken JSON-lines records, ingest keeps exactly the valid
texts (first occurrences, in input order, byte for byte) and accounts for every line as a
document, a counted reject or a dropped duplicate. (The schedule builder's properties, documents
conserved and budgets respected, live in tests/schedule/test_schedule_strategies.py.)"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from framelm.pipeline import build_config, run_stage
from framelm.rundir import RunDir

BROKEN_LINES = {
    b'{"id": "x", "text": ': "invalid_json",
    b"not json at all": "invalid_json",
    b'["a", "list"]': "invalid_json",
    b'"a bare string"': "invalid_json",
    b'{"id": "x", "text": "caf\xe9"}': "undecodable_bytes",
    b'{"id": "x", "text": 5}': "non_string_text",
    b'{"id": "x", "body": "wrong field"}': "missing_text",
    b'{"id": "x", "text": null}': "missing_text",
    b'{"id": "x", "text": "  \\t\\n "}': "empty_text",
}

records = st.lists(
    st.one_of(
        st.text(min_size=0, max_size=40).map(lambda t: ("text", t)),
        st.sampled_from(sorted(BROKEN_LINES)).map(lambda line: ("line", line)),
    ),
    min_size=1, max_size=40,
)


def expected_outcome(text: str) -> str:
    """What ingest must do with a record whose text is `text`: keep it or the reject reason."""
    if not text.strip():
        return "empty_text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates survive JSON but are not Unicode text
        return "undecodable_bytes"
    return "keep"


@given(records=records, docs_per_shard=st.integers(1, 7))
@settings(max_examples=25, deadline=None)
def test_counts_add_up_and_valid_texts_are_preserved(records, docs_per_shard):
    lines, kept, rejects, duplicates, seen = [], [], [], 0, set()
    for i, (kind, value) in enumerate(records):
        if kind == "line":
            lines.append(value)
            rejects.append((BROKEN_LINES[value], len(lines)))
            continue
        lines.append(json.dumps({"id": f"r{i}", "text": value}).encode())
        outcome = expected_outcome(value)
        if outcome != "keep":
            rejects.append((outcome, len(lines)))
        elif value in seen:
            duplicates += 1
        else:
            seen.add(value)
            kept.append(value)

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mixed.jsonl"
        src.write_bytes(b"\n".join(lines) + b"\n")
        run = RunDir(Path(tmp) / "run")
        cfg = build_config("ingest", {"inputs": [str(src)], "docs_per_shard": docs_per_shard})
        if not kept:
            try:
                run_stage("ingest", cfg, run)
            except Exception as exc:  # no usable document is a user error naming the reasons
                assert type(exc).__name__ == "FramelmError" and "no usable documents" in str(exc)
                return
            raise AssertionError("ingest of no valid record must fail")
        counts = run_stage("ingest", cfg, run)
        parts = sorted(run.path("ingest", "documents").glob("part-*.parquet"))
        texts = [t for p in parts for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
        got_rejects = [json.loads(ln) for ln in run.path("ingest", "rejects.jsonl").read_text().splitlines()]

    assert texts == kept
    assert [(r["reason"], r["line"]) for r in got_rejects] == rejects
    assert counts["docs"] == len(kept) and counts["rejected"] == len(rejects) and counts["duplicates_dropped"] == duplicates
    assert counts["docs"] + counts["rejected"] + counts["duplicates_dropped"] == len(lines)
    assert len(parts) == -(-len(kept) // docs_per_shard)
