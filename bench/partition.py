"""Benchmark: partition + frame schedule on synthetic scores, against a naive pandas pipeline.

Synthetic scores.parquet: ppl lognormal, pd beta(2, 5), n_tokens lognormal, 5 sources, 5 %
held out. framelm runs `framelm partition` (DuckDB, 2 threads) and `framelm schedule` (frame
only) on --rows rows; the baseline a user would write (pandas: read everything, medians,
groupby-transform, shuffle each quadrant, write) runs on --baseline-rows rows, and framelm
runs again on that size so the ratio compares equal work. Each measured job runs in its own
process so its peak RSS is its own. Prints one JSON object.

    python bench/partition.py --rows 100000000 --baseline-rows 10000000
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder first on sys.path, where a sibling benchmark named like a
# standard module (bench/tokenize.py) would shadow it for numpy and friends.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCES = ["web", "books", "forum", "math", "wiki"]
CHUNK = 4_000_000


def make_scores(path: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("split", pa.string()), ("n_tokens", pa.int64()),
                        ("ppl", pa.float64()), ("pd", pa.float64()), ("status", pa.string())])
    sources = pa.array(SOURCES)
    splits = pa.array(["train", "heldout"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for lo in range(0, rows, CHUNK):
            n = min(CHUNK, rows - lo)
            ids = pc.binary_join_element_wise("doc-", pa.array(np.arange(lo, lo + n)).cast(pa.string()), "")
            writer.write_table(pa.table({
                "id": ids,
                "source": sources.take(pa.array(rng.integers(0, len(SOURCES), n))),
                "split": splits.take(pa.array((rng.random(n) < 0.05).astype(np.int64))),
                "n_tokens": np.maximum(1, rng.lognormal(6, 1, n)).astype(np.int64),
                "ppl": rng.lognormal(3, 0.6, n), "pd": rng.beta(2, 5, n),
                "status": pa.repeat(pa.scalar("ok"), n),
            }, schema=schema))


def run_framelm(run_dir: str) -> dict:
    from framelm.partition import PartitionConfig, partition_documents
    from framelm.rundir import RunDir
    from framelm.schedule import ScheduleConfig, StrategyConfig, build_schedules

    run = RunDir(run_dir)
    t0 = time.perf_counter()
    partition_documents(PartitionConfig(threads=2), run)
    t1 = time.perf_counter()
    build_schedules(ScheduleConfig(strategies=[StrategyConfig(kind="frame")]), run)
    t2 = time.perf_counter()
    return {"partition_s": round(t1 - t0, 2), "schedule_s": round(t2 - t1, 2), "seconds": round(t2 - t0, 2)}


def run_pandas(run_dir: str) -> dict:
    """What a user would write first: everything in one DataFrame."""
    import pandas as pd

    run = Path(run_dir)
    t0 = time.perf_counter()
    df = pd.read_parquet(run / "score/scores.parquet")
    df = df[(df.status == "ok") & np.isfinite(df.ppl) & np.isfinite(df.pd)]
    train = df[df.split == "train"]
    ppl_cut = train.ppl.median()
    df["ppl_bin"] = (df.ppl > ppl_cut).astype("int8")
    pd_cuts = df[df.split == "train"].groupby("ppl_bin").pd.median()
    df["pd_bin"] = (df.pd > df.ppl_bin.map(pd_cuts)).astype("int8")
    df["quadrant"] = "Q" + (1 + 2 * df.ppl_bin + df.pd_bin).astype(str)
    out = run / "pandas"
    out.mkdir(exist_ok=True)
    df[["id", "source", "split", "n_tokens", "ppl", "pd", "ppl_bin", "pd_bin", "quadrant"]].to_parquet(out / "quadrants.parquet")
    t1 = time.perf_counter()
    train = df[df.split == "train"]
    parts = [train[train.quadrant == q].sample(frac=1.0, random_state=0) for q in ("Q3", "Q4", "Q1", "Q2")]
    order = pd.concat(parts, ignore_index=True)[["id", "source", "quadrant", "n_tokens"]]
    order.insert(0, "position", np.arange(len(order)))
    order["stage"] = order.quadrant.map({"Q3": 0, "Q4": 1, "Q1": 2, "Q2": 3}).astype("int32")
    order["epoch"] = np.int32(0)
    order.to_parquet(out / "order.parquet")
    t2 = time.perf_counter()
    return {"partition_s": round(t1 - t0, 2), "schedule_s": round(t2 - t1, 2), "seconds": round(t2 - t0, 2)}


def measured(job: str, run_dir: Path) -> dict:
    """Run one job in a child process; return its timings and peak RSS."""
    env = dict(os.environ, TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, __file__, "--job", job, "--run-dir", str(run_dir)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--baseline-rows", type=int, default=10_000_000)
    ap.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--job", choices=["framelm", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        result = (run_framelm if args.job == "framelm" else run_pandas)(args.run_dir)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)  # all threads; wall time depends on the machine's load
        result["peak_rss_gb"] = round(usage.ru_maxrss / 2**20, 3)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        small, large = Path(tmp) / "small", Path(tmp) / "large"
        make_scores(small / "score/scores.parquet", args.baseline_rows)
        baseline = measured("pandas", small)
        framelm_small = measured("framelm", small)
        for p in small.rglob("*.parquet"):  # free the disk before the large run
            p.unlink()
        make_scores(large / "score/scores.parquet", args.rows)
        framelm_large = measured("framelm", large)
    print(json.dumps({
        "machine": f"{os.cpu_count()} cpus, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "rows": args.rows, "framelm": framelm_large,
        "rows_per_s": round(args.rows / framelm_large["seconds"]),
        "baseline_rows": args.baseline_rows, "pandas_baseline": baseline, "framelm_at_baseline_rows": framelm_small,
        "speedup_vs_pandas": round(baseline["seconds"] / framelm_small["seconds"], 2),
        "rss_ratio_pandas_over_framelm": round(baseline["peak_rss_gb"] / framelm_small["peak_rss_gb"], 2),
    }, indent=None))


if __name__ == "__main__":
    main()
