"""The GPU benchmarks (bench/train.py, bench/score.py) run on CPU at their smoke sizes and report
every arm without an error, so a change cannot break the script a GPU run gets one attempt at.
Their figures are not checked here: speed is measured by the benchmarks, never by a test."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARMS = ("framelm", "hf_llama", "framelm_fit", "batch_reader", "framelm_doc_masking")


def run_bench(module: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_train_benchmark_runs_every_arm():
    result = run_bench("bench.train", "--smoke")
    for arm in TRAIN_ARMS:
        assert "error" not in result[arm] and result[arm]["tokens_per_s"] > 0 and result[arm]["elapsed_s"] >= 0, arm
    assert result["speedup_vs_hf"] > 0 and result["fit_vs_step"] > 0


@pytest.mark.slow
def test_the_score_benchmark_runs_every_arm(tmp_path):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jugs".split()
    for k, source in enumerate(("web", "math", "books")):
        with gzip.open(tmp_path / f"{source}.jsonl.gz", "wt", encoding="utf-8") as fh:
            for i in range(4):
                text = " ".join(words[(i * 5 + j * (k + 1)) % len(words)] for j in range(40 + 400 * (i % 2)))
                fh.write(json.dumps({"id": f"{source}-{i}", "source": source, "text": text}) + "\n")
    result = run_bench("bench.score", "--corpus", str(tmp_path), "--shape", "tiny", "--max-docs", "12",
                       "--tokens-per-batch", "2048", "--docs-per-shard", "6")
    assert result["docs"] == 12 and "error" not in result["baseline"]
    for backend in ("framelm", "transformers"):
        arm = result[f"framelm_backend_{backend}"]
        assert "error" not in arm, arm
        # both models (one tokenizer) predicted every token, at least the truncating baseline's, and the rate counts both
        assert arm["tokens"]["weak"] == arm["tokens"]["strong"] >= result["baseline"]["tokens"] > 0
        assert arm["tokens_per_s"] == pytest.approx((arm["tokens"]["weak"] + arm["tokens"]["strong"]) / arm["seconds"], rel=1e-3)
        assert result[f"speedup_backend_{backend}"] > 0
    # the two backends score alike
    ours, theirs = (result[f"framelm_backend_{b}"]["mean_log_ppl"] for b in ("framelm", "transformers"))
    assert ours == pytest.approx(theirs, abs=1e-4)
