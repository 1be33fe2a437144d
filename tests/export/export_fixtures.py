"""The export tests' tiny run directory, laid out as ARCHITECTURE.md says: token store,
documents and a schedule.

The schedule has three stages (Q3 -> Q4 -> Q1) with interleaved transition windows between
them, and repeats a few documents in a second epoch. `expected_stream` is computed here with a
plain per-document loop, independently of framelm.export.

A module of its own rather than conftest.py: `from conftest import` picks whichever conftest
was imported first when pytest is given several test folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from framelm.rundir import RunDir

EOS = 0
STAGE_NAMES = ["Q3", "Q4", "Q1"]
SOURCES = ["books", "forum", "math"]


@dataclass
class TinyRun:
    run: RunDir
    schedule: str
    order: pa.Table  # order.parquet as written
    doc_tokens: dict[str, np.ndarray]  # id -> document tokens (no EOS)
    doc_text: dict[str, str]
    dtype: np.dtype
    stage_ranges: list[tuple[str, int, int]]

    def expected_docs(self) -> list[np.ndarray]:
        """Each scheduled document's tokens followed by EOS, in order.parquet's position order."""
        ids = self.order.column("id").to_pylist()
        return [np.append(self.doc_tokens[i], EOS).astype(self.dtype) for i in ids]

    def expected_stream(self) -> np.ndarray:
        return np.concatenate(self.expected_docs())


def _interleave(a: list[int], b: list[int], tail: int, head: int) -> list[int]:
    """a's last `tail` items and b's first `head` items alternate; the rest keeps its order."""
    mixed_a, mixed_b = a[len(a) - tail:], b[:head]
    window = []
    for k in range(max(tail, head)):
        if k < tail:
            window.append(mixed_a[k])
        if k < head:
            window.append(mixed_b[k])
    return a[:len(a) - tail] + window + b[head:]


def build_tiny_run(root: Path, *, vocab_size: int = 300, n_docs: int = 40, seed: int = 0,
                   schedule: str = "frame") -> TinyRun:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    run = RunDir(root)
    ids = [f"doc-{i:03d}" for i in range(n_docs)]
    doc_tokens = {i: rng.integers(1, vocab_size, size=int(rng.integers(1, 25))).astype(dtype) for i in ids}
    doc_text = {i: f"text of {i} " + "lorem ipsum " * int(rng.integers(0, 4)) for i in ids}

    # token store laid out in a shuffled order so offsets differ from schedule positions
    store_order = rng.permutation(n_docs)
    pieces, offsets, pos = [], {}, 0
    for k in store_order:
        doc = ids[k]
        offsets[doc] = pos
        pieces.append(np.append(doc_tokens[doc], EOS).astype(dtype))
        pos += len(doc_tokens[doc]) + 1
    tokens = np.concatenate(pieces)
    tok_dir = run.path("tokenize")
    tok_dir.mkdir(parents=True)
    tokens.tofile(tok_dir / "tokens.bin")
    pq.write_table(pa.table({
        "id": [ids[k] for k in store_order], "source": [SOURCES[k % 3] for k in store_order],
        "split": ["train"] * n_docs, "offset": pa.array([offsets[ids[k]] for k in store_order], pa.int64()),
        "n_tokens": pa.array([len(doc_tokens[ids[k]]) for k in store_order], pa.int64()),
        "n_bytes": pa.array([len(doc_text[ids[k]]) for k in store_order], pa.int64()),
    }), tok_dir / "index.parquet")
    (tok_dir / "meta.json").write_text(json.dumps({
        "dtype": dtype.name, "vocab_size": vocab_size, "eos_id": EOS, "n_docs": n_docs,
        "n_tokens": int(len(tokens)), "tokenizer": "tokenize/tokenizer"}))

    docs_dir = run.path("ingest", "documents")
    docs_dir.mkdir(parents=True)
    for part, chunk in enumerate((ids[: n_docs // 2], ids[n_docs // 2:])):
        pq.write_table(pa.table({
            "id": chunk, "source": [SOURCES[int(i[-3:]) % 3] for i in chunk], "split": ["train"] * len(chunk),
            "text": [doc_text[i] for i in chunk], "n_chars": [len(doc_text[i]) for i in chunk],
            "n_bytes": [len(doc_text[i].encode()) for i in chunk]}), docs_dir / f"part-{part:05d}.parquet")

    # three stages; the third repeats five documents of the first in a second epoch
    third = n_docs * 3 // 8
    stage_docs = [list(range(0, third)), list(range(third, 2 * third)), list(range(2 * third, n_docs)) + [0, 1, 2, 3, 4]]
    sequence = []
    for s, docs in enumerate(stage_docs):
        labelled = [(s, d, 1 if (s == 2 and d < 5) else 0) for d in docs]
        sequence = labelled if not sequence else _interleave(sequence, labelled, tail=4, head=3)
    order = pa.table({
        "position": pa.array(range(len(sequence)), pa.int64()),
        "id": [ids[d] for _, d, _ in sequence],
        "stage": pa.array([s for s, _, _ in sequence], pa.int32()),
        "source": [SOURCES[d % 3] for _, d, _ in sequence],
        "quadrant": [STAGE_NAMES[s] for s, _, _ in sequence],
        "n_tokens": pa.array([len(doc_tokens[ids[d]]) for _, d, _ in sequence], pa.int64()),
        "epoch": pa.array([e for _, _, e in sequence], pa.int32()),
    })
    # nominal stage boundaries: the start of the first document of the next stage
    lengths = np.array([len(doc_tokens[ids[d]]) + 1 for _, d, _ in sequence])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    labels = np.array([s for s, _, _ in sequence])
    bounds = [0] + [int(starts[np.flatnonzero(labels == s)[0]]) for s in (1, 2)] + [int(starts[-1])]
    stage_ranges = [(STAGE_NAMES[s], bounds[s], bounds[s + 1]) for s in range(3)]
    sched_dir = run.path("schedule", schedule)
    sched_dir.mkdir(parents=True)
    pq.write_table(order, sched_dir / "order.parquet")
    (sched_dir / "stages.yaml").write_text(yaml.safe_dump({
        "strategy": schedule, "seq_len": 8, "global_batch": 2,
        "stages": [{"name": n, "start_token": a, "end_token": b, "start_step": a // 16, "end_step": b // 16,
                    "composition": {"cells": {n: 1.0}}} for n, a, b in stage_ranges],
    }, sort_keys=False))
    return TinyRun(run, schedule, order, doc_tokens, doc_text, dtype, stage_ranges)


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def build_stage_run(root: Path, stage_lengths: list[list[int]], *, seq_len: int, global_batch: int,
                    vocab_size: int = 300, seed: int = 0, schedule: str = "frame") -> TinyRun:
    """A run whose schedule trains stages S0, S1, ... one after another (hard switches, so one
    segment per stage), stage k holding documents of the lengths stage_lengths[k] (EOS included).
    Sizes a test picks exactly, e.g. a segment of exactly one step of tokens."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    run = RunDir(root)
    names = [f"S{k}" for k in range(len(stage_lengths))]
    docs = [(k, n) for k, lengths in enumerate(stage_lengths) for n in lengths]
    ids = [f"doc-{i:03d}" for i in range(len(docs))]
    doc_tokens = {i: rng.integers(1, vocab_size, size=n - 1).astype(dtype) for i, (_, n) in zip(ids, docs)}
    lengths = np.array([n for _, n in docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tok_dir = run.path("tokenize")
    tok_dir.mkdir(parents=True)
    np.concatenate([np.append(doc_tokens[i], EOS).astype(dtype) for i in ids]).tofile(tok_dir / "tokens.bin")
    pq.write_table(pa.table({
        "id": ids, "source": [SOURCES[0]] * len(ids), "split": ["train"] * len(ids),
        "offset": pa.array(offsets, pa.int64()), "n_tokens": pa.array(lengths - 1, pa.int64()),
        "n_bytes": pa.array(lengths - 1, pa.int64())}), tok_dir / "index.parquet")
    (tok_dir / "meta.json").write_text(json.dumps({
        "dtype": dtype.name, "vocab_size": vocab_size, "eos_id": EOS, "n_docs": len(ids),
        "n_tokens": int(lengths.sum()), "tokenizer": "tokenize/tokenizer"}))
    order = pa.table({
        "position": pa.array(range(len(ids)), pa.int64()), "id": ids,
        "stage": pa.array([k for k, _ in docs], pa.int32()), "source": [SOURCES[0]] * len(ids),
        "quadrant": [names[k] for k, _ in docs], "n_tokens": pa.array(lengths - 1, pa.int64()),
        "epoch": pa.array([0] * len(ids), pa.int32())})
    bounds = np.concatenate([[0], np.cumsum([sum(s) for s in stage_lengths])]).tolist()
    stage_ranges = [(names[k], bounds[k], bounds[k + 1]) for k in range(len(names))]
    sched_dir = run.path("schedule", schedule)
    sched_dir.mkdir(parents=True)
    pq.write_table(order, sched_dir / "order.parquet")
    (sched_dir / "stages.yaml").write_text(yaml.safe_dump({
        "strategy": schedule, "seq_len": seq_len, "global_batch": global_batch,
        "stages": [{"name": n, "start_token": a, "end_token": b, "composition": {"cells": {n: 1.0}}}
                   for n, a, b in stage_ranges]}, sort_keys=False))
    return TinyRun(run, schedule, order, doc_tokens, {}, dtype, stage_ranges)
