"""What a crash costs: finishing `framelm ingest` after a SIGKILL halfway, against the baseline
a user falls back to without resumable shards, which is running the whole stage again.

Input: the shared corpus (../shared/data/corpus/*.jsonl.gz) or, where that is absent, the
built-in corpus. Three runs of the real command (`python -m framelm ingest ... --quiet`), each
timed from the moment it holds its stage lock to its exit (start-up excluded):

- full: an uninterrupted run (what a re-run from scratch costs);
- killed: a run SIGKILLed once half of its shards are published;
- resume: the same command again, finishing the killed run.

The resumed output is checked byte for byte against the uninterrupted one. Prints one JSON
object; `resume_vs_rerun` is resume time / full time (lower is better).

    python bench/resume.py --docs-per-shard 2000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


def argv(run_dir: Path, inputs: list[str], docs_per_shard: int) -> list[str]:
    return [sys.executable, "-m", "framelm", "ingest", "--run-dir", str(run_dir), "--quiet",
            "--inputs", *inputs, "--docs-per-shard", str(docs_per_shard)]


def wait_for_lock(proc: subprocess.Popen, run_dir: Path) -> float:
    lock = run_dir / ".locks" / "ingest.lock"
    while proc.poll() is None:
        if lock.is_file() and lock.read_text().startswith(f"pid {proc.pid} "):
            return time.perf_counter()
        time.sleep(0.002)
    raise SystemExit(f"ingest exited before taking its lock: {proc.communicate()}")


def timed_run(cmd: list[str], run_dir: Path) -> float:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    locked = wait_for_lock(proc, run_dir)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(err.decode())
    return time.perf_counter() - locked


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs-per-shard", type=int, default=2000)
    args = parser.parse_args()
    inputs = [str(p) for p in sorted(SHARED_CORPUS.glob("*.jsonl.gz"))] or ["builtin"]

    with tempfile.TemporaryDirectory() as tmp:
        full_dir, killed_dir = Path(tmp) / "full", Path(tmp) / "killed"
        full_s = timed_run(argv(full_dir, inputs, args.docs_per_shard), full_dir)
        n_shards = len(list((full_dir / "ingest" / "documents").glob("*.parquet")))

        proc = subprocess.Popen(argv(killed_dir, inputs, args.docs_per_shard), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        locked = wait_for_lock(proc, killed_dir)
        docs = killed_dir / "ingest" / "documents"
        while proc.poll() is None and len(list(docs.glob("*.done"))) < n_shards // 2:
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_s = time.perf_counter() - locked
        done_at_kill = len(list(docs.glob("*.done")))

        resume_s = timed_run(argv(killed_dir, inputs, args.docs_per_shard), killed_dir)
        identical = digests(full_dir / "ingest") == digests(killed_dir / "ingest")

    print(json.dumps({
        "bench": "resume after SIGKILL vs re-run from scratch (framelm ingest)",
        "input": "shared corpus (5 files)" if inputs != ["builtin"] else "builtin corpus",
        "shards": n_shards, "shards_done_at_kill": done_at_kill,
        "full_s": round(full_s, 3), "killed_after_s": round(killed_s, 3), "resume_s": round(resume_s, 3),
        "resume_vs_rerun": round(resume_s / full_s, 3), "byte_identical": identical,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }))


if __name__ == "__main__":
    main()
