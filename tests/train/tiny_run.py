"""A tiny synthetic run directory (tokenize + partition + export outputs) for trainer tests.

Documents come from per-source Markov chains over a 64-token vocabulary (token 0 is EOS), so
a model can learn them and held-out loss per source means something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from framelm.labels import write_labels
from framelm.rundir import RunDir

VOCAB = 64
EOS = 0
SOURCES = ("alpha", "beta")
FRAME_CELLS = [("Q1", 0, 0), ("Q2", 0, 1), ("Q3", 1, 0), ("Q4", 1, 1)]


def _doc(rng: np.random.Generator, source: int, length: int) -> np.ndarray:
    # source 0 counts up by 1, source 1 by 3 (mod 63), with occasional random jumps
    step = (1, 3)[source]
    tokens = np.empty(length, dtype=np.int64)
    tokens[0] = rng.integers(1, VOCAB)
    for i in range(1, length):
        jump = rng.random() < 0.1
        tokens[i] = rng.integers(1, VOCAB) if jump else (tokens[i - 1] - 1 + step) % (VOCAB - 1) + 1
    return tokens


def make_tiny_run(root: Path, n_docs: int = 120, seed: int = 0, schedule: str = "frame",
                  tokenizer: bool = False) -> Path:
    """Write RUN/tokenize, RUN/score/scores.parquet (ids and splits only) with its labels
    RUN/partition/quadrants.parquet, and RUN/export/<schedule>/stream."""
    rng = np.random.default_rng(seed)
    rows, chunks, offset = [], [], 0
    for i in range(n_docs):
        source = i % 2
        doc = _doc(rng, source, int(rng.integers(20, 120)))
        split = ("ref", "heldout", "train", "train", "train")[i % 5]
        rows.append({"id": f"d{i:04d}", "source": SOURCES[source], "split": split, "offset": offset,
                     "n_tokens": len(doc), "n_bytes": 3 * len(doc)})
        chunks += [doc, [EOS]]
        offset += len(doc) + 1
    store = np.concatenate(chunks).astype(np.uint16)
    tok = root / "tokenize"
    tok.mkdir(parents=True)
    store.tofile(tok / "tokens.bin")
    pq.write_table(pa.Table.from_pylist(rows), tok / "index.parquet")
    (tok / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": VOCAB, "eos_id": EOS, "n_docs": n_docs,
                                              "n_tokens": len(store), "tokenizer": "tokenize/tokenizer"}))
    if tokenizer:
        write_tokenizer(tok / "tokenizer")
    (root / "score").mkdir()
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "split": [r["split"] for r in rows]}), root / "score" / "scores.parquet")
    (root / "partition").mkdir()
    write_labels(root / "partition" / "quadrants.parquet", root / "score" / "scores.parquet", FRAME_CELLS,
                 [np.array([0 if r["source"] == "alpha" else 2 for r in rows])])  # Q1 or Q3
    # The schedule: all "alpha" training documents first (stage Q1), then all "beta" (stage Q3).
    train = [r for r in rows if r["split"] == "train"]
    stream_parts, stages, position = [], [], 0
    for name, source in (("Q1", "alpha"), ("Q3", "beta")):
        start = position
        for r in (r for r in train if r["source"] == source):
            stream_parts.append(store[r["offset"]: r["offset"] + r["n_tokens"] + 1])
            position += r["n_tokens"] + 1
        stages.append({"name": name, "start_token": start, "end_token": position})
    stream = np.concatenate(stream_parts)
    out = root / "export" / schedule / "stream"
    out.mkdir(parents=True)
    stream.tofile(out / "tokens.bin")
    (out / "meta.json").write_text(json.dumps({"dtype": "uint16", "n_tokens": len(stream), "eos_id": EOS,
                                              "vocab_size": VOCAB, "stages": stages}))
    run = RunDir(root)
    for stage in ("tokenize", "partition"):  # upstream records the pipeline checks
        run.update_record(stage, {"stage": stage, "status": "done", "hash": f"synthetic-{stage}-{seed}"})
    run.update_record("export", {"stage": "export", "status": "done", "hash": f"synthetic-export-{seed}",
                                 "counts": {"parts": {schedule: f"synthetic-stream-{schedule}-{seed}"}}})
    return root


def write_tokenizer(path: Path) -> None:
    """A word-level HF tokenizer whose ids match the synthetic vocabulary ("t0" = EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="t0", unk_token="t1").save_pretrained(path)
