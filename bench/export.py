"""Tokens per second of `framelm export` (stream format) against the loop a user would write first.

Builds a synthetic run directory in a temporary folder (untimed): a uint16 token store of
--docs documents with log-normal lengths, laid out in random order, and a four-stage schedule
whose order.parquet visits the documents in another random order. Then times, in the same
process and on the same files:

- baseline: pandas reads order.parquet and index.parquet, merges them, and a Python loop writes
  `tokens[offset : offset + n_tokens + 1]` of each document to one file (nanoGPT-prepare style);
- framelm: `export_schedules` with formats [stream] (the DuckDB join into the plan, the
  vectorised gather, the atomic write), and separately with [stream, llmc, megatron].

Checks that baseline and framelm wrote identical bytes, and prints one JSON object.

    python bench/export.py --docs 200000
"""

from __future__ import annotations

import os
import sys

# bench/tokenize.py shadows the standard library's `tokenize` (imported by inspect); keep this
# folder off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: it reads the variable once

import argparse  # noqa: E402  (after the path fix above)
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from framelm.export import ExportConfig, export_schedules
from framelm.rundir import RunDir

EOS = 0


def build_run(root: Path, n_docs: int, log_mean: float, seed: int) -> int:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(log_mean, 1.0, n_docs).astype(np.int64), 1, 50_000)
    ids = np.array([f"doc{i:09d}" for i in range(n_docs)], dtype=object)
    layout = rng.permutation(n_docs)
    offsets = np.zeros(n_docs, np.int64)
    offsets[layout] = np.concatenate([[0], np.cumsum(lengths[layout] + 1)[:-1]])
    n_tokens = int((lengths + 1).sum())
    tok = root / "tokenize"
    tok.mkdir(parents=True)
    store = np.memmap(tok / "tokens.bin", dtype=np.uint16, mode="w+", shape=(n_tokens,))
    for a in range(0, n_tokens, 1 << 24):
        store[a:a + (1 << 24)] = rng.integers(1, 50_000, size=min(1 << 24, n_tokens - a), dtype=np.uint16)
    store[offsets + lengths] = EOS
    store.flush()
    del store
    pq.write_table(pa.table({"id": ids, "source": ["web"] * n_docs, "split": ["train"] * n_docs,
                             "offset": offsets, "n_tokens": lengths, "n_bytes": lengths * 4}), tok / "index.parquet")
    (tok / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 50_000, "eos_id": EOS,
                                               "n_docs": n_docs, "n_tokens": n_tokens}))
    order_idx = rng.permutation(n_docs)
    stage = (np.arange(n_docs) * 4 // n_docs).astype(np.int32)
    sched = root / "schedule" / "frame"
    sched.mkdir(parents=True)
    pq.write_table(pa.table({
        "position": np.arange(n_docs, dtype=np.int64), "id": ids[order_idx], "stage": stage,
        "source": ["web"] * n_docs, "quadrant": [f"Q{s + 1}" for s in stage], "n_tokens": lengths[order_idx],
        "epoch": np.zeros(n_docs, np.int32)}), sched / "order.parquet")
    ends = np.cumsum(lengths[order_idx] + 1)
    bounds = [0] + [int(ends[np.flatnonzero(stage == s)[-1]]) for s in range(4)]
    (sched / "stages.yaml").write_text(yaml.safe_dump({"seq_len": 1024, "global_batch": 32, "stages": [
        {"name": f"Q{s + 1}", "start_token": bounds[s], "end_token": bounds[s + 1]} for s in range(4)]}))
    return n_tokens


def baseline(root: Path, out: Path) -> None:
    import pandas as pd

    order = pd.read_parquet(root / "schedule/frame/order.parquet", columns=["position", "id"])
    index = pd.read_parquet(root / "tokenize/index.parquet", columns=["id", "offset", "n_tokens"])
    merged = order.merge(index, on="id", how="left").sort_values("position")
    tokens = np.memmap(root / "tokenize/tokens.bin", dtype=np.uint16, mode="r")
    with open(out, "wb") as fh:
        for offset, n in zip(merged["offset"].to_numpy(), merged["n_tokens"].to_numpy()):
            fh.write(tokens[offset:offset + n + 1].tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--log-mean", type=float, default=5.5,
                    help="mean of log(document tokens); 5.5 is ~400 tokens per document, 3.0 ~30 (short math/QA)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="framelm-bench-export-") as tmp:
        root = Path(tmp) / "run"
        n_tokens = build_run(root, args.docs, args.log_mean, args.seed)

        t0 = time.perf_counter()
        baseline(root, Path(tmp) / "baseline.bin")
        t_base = time.perf_counter() - t0

        run = RunDir(root)
        t0 = time.perf_counter()
        export_schedules(ExportConfig(formats=["stream"]), run)
        t_stream = time.perf_counter() - t0
        same = (Path(tmp) / "baseline.bin").read_bytes() == (root / "export/frame/stream/tokens.bin").read_bytes()

        shutil.rmtree(root / "export")
        t0 = time.perf_counter()
        export_schedules(ExportConfig(formats=["stream", "llmc", "megatron"]), run)
        t_three = time.perf_counter() - t0

    print(json.dumps({
        "bench": "export", "docs": args.docs, "tokens": n_tokens, "mean_doc_tokens": round(n_tokens / args.docs, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}",
        "baseline_pandas_loop_s": round(t_base, 3), "framelm_stream_s": round(t_stream, 3),
        "framelm_stream_llmc_megatron_s": round(t_three, 3),
        "baseline_tokens_per_s": round(n_tokens / t_base), "framelm_stream_tokens_per_s": round(n_tokens / t_stream),
        "speedup_stream_vs_baseline": round(t_base / t_stream, 2), "identical_bytes": same,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()
