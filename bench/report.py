"""Benchmark: the report's score figures on a large labelled score table, against pandas + hexbin.

Synthetic RUN/score/scores.parquet (ppl lognormal, pd normal, 5 sources, 10 % held out) with
its labels RUN/partition/quadrants.parquet (FRAME's nested-median quadrants). framelm runs
`build_report` on a run directory that holds only those (DuckDB joins and bins them out of
core: the density figure, the quadrant bars and table). The baseline is what a user would write: pandas reads the columns, matplotlib
`hexbin` draws every document (all sources + one panel per source), a groupby + stacked bar
plot gives the quadrant composition. Each job runs in its own process so its peak RSS is its
own. Prints one JSON object.

    python -P bench/report.py --rows 5000000   (-P: bench/tokenize.py must not shadow the stdlib)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCES = ["web", "books", "forum", "math", "wiki"]
CHUNK = 2_000_000


def make_scored_run(root: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from framelm.labels import write_labels

    rng = np.random.default_rng(seed)
    sources, splits = pa.array(SOURCES), pa.array(["train", "heldout"])
    scores = root / "score" / "scores.parquet"
    for p in (scores, root / "partition" / "quadrants.parquet"):
        p.parent.mkdir(parents=True, exist_ok=True)
    # cut points of FRAME's nested medians, fit on the distribution the rows are drawn from
    ppl_cut, pd_cut = float(np.exp(3.0)), 0.3
    writer, cells = None, []
    for lo in range(0, rows, CHUNK):
        n = min(CHUNK, rows - lo)
        ppl = rng.lognormal(3.0, 0.6, n)
        pd = rng.normal(0.3, 0.1, n)
        cells.append(2 * (ppl > ppl_cut).astype(np.int16) + (pd > pd_cut))
        table = pa.table({
            "id": pc.binary_join_element_wise("doc-", pa.array(np.arange(lo, lo + n)).cast(pa.string()), ""),
            "source": sources.take(pa.array(rng.integers(0, len(SOURCES), n))),
            "split": splits.take(pa.array((rng.random(n) < 0.1).astype(np.int64))),
            "n_tokens": np.maximum(1, rng.lognormal(6, 1, n)).astype(np.int64),
            "ppl": ppl, "pd": pd, "status": pa.repeat(pa.scalar("ok"), n),
        })
        if writer is None:
            writer = pq.ParquetWriter(scores, table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()
    write_labels(root / "partition" / "quadrants.parquet", scores, [("Q1", 0, 0), ("Q2", 0, 1), ("Q3", 1, 0), ("Q4", 1, 1)], cells)


def run_framelm(run_dir: str) -> None:
    from framelm.report import ReportConfig, build_report
    from framelm.rundir import RunDir

    build_report(ReportConfig(), RunDir(run_dir))


def run_baseline(run_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_parquet(Path(run_dir) / "score" / "scores.parquet", columns=["source", "split", "n_tokens", "ppl", "pd"])
    df["quadrant"] = pd.read_parquet(Path(run_dir) / "partition" / "quadrants.parquet")["quadrant"].to_numpy()
    groups = [("all sources", df)] + list(df.groupby("source"))
    fig, axes = plt.subplots(2, 3, figsize=(12.6, 6.8))
    for ax, (name, g) in zip(axes.flat, groups):
        ax.hexbin(g["ppl"], g["pd"], xscale="log", bins="log", gridsize=80)
        ax.axvline(df["ppl"].median(), color="red", ls="--")
        ax.set_title(name)
    out = Path(run_dir) / "baseline"
    out.mkdir(exist_ok=True)
    fig.savefig(out / "scores.png", dpi=110)
    train = df[df["split"] == "train"]
    mix = train.groupby(["quadrant", "source"])["n_tokens"].sum().unstack()
    ax = mix.plot.bar(stacked=True, figsize=(8, 4))
    ax.figure.savefig(out / "quadrants.png", dpi=110)


def child(which: str, run_dir: str) -> None:
    start = time.perf_counter()
    (run_framelm if which == "framelm" else run_baseline)(run_dir)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": round(seconds, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                      "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}))


def measure(which: str, run_dir: str) -> dict:
    out = subprocess.run([sys.executable, "-P", __file__, "--child", which, run_dir], check=True, capture_output=True,
                         text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000, help="documents in the score table")
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_scored_run(Path(tmp), args.rows)
        framelm = measure("framelm", tmp)
        baseline = measure("baseline", tmp)
    print(json.dumps({
        "benchmark": "report score figures (density + quadrant composition)",
        "rows": args.rows,
        "framelm_s": framelm["seconds"], "framelm_cpu_s": framelm["cpu_s"], "framelm_peak_rss_mb": framelm["peak_rss_mb"],
        "baseline": "pandas.read_parquet + matplotlib hexbin per source + groupby stacked bars",
        "baseline_s": baseline["seconds"], "baseline_cpu_s": baseline["cpu_s"],
        "baseline_peak_rss_mb": baseline["peak_rss_mb"],
        "speedup": round(baseline["seconds"] / framelm["seconds"], 2),
        "cpu_ratio": round(baseline["cpu_s"] / framelm["cpu_s"], 2),
        "peak_rss_ratio": round(baseline["peak_rss_mb"] / framelm["peak_rss_mb"], 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs: compare cpu_s), {platform.python_version()}",
    }))


if __name__ == "__main__":
    main()
