"""Two processes running the same stage in one run directory: the second gets a clear lock
error and touches nothing; the first finishes with the same outputs as a lone run.

The first process is frozen (SIGSTOP) while it holds the stage lock, so the race is
deterministic rather than a matter of timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from .harness import (assert_same_outputs, finish, framelm_argv, run_uninterrupted, start, subprocess_env,
                      wait_for_lock)


def write_corpus(path, n_docs: int = 2000):
    with open(path, "w") as fh:
        for i in range(n_docs):
            fh.write(json.dumps({"id": f"d{i}", "text": f"document {i} " + "words and more words " * (i % 13 + 1)}) + "\n")
    return path


def test_second_process_is_refused_while_the_first_holds_the_stage(tmp_path):
    corpus = write_corpus(tmp_path / "web.jsonl")
    ref, run = tmp_path / "ref", tmp_path / "run"
    argv = framelm_argv(["ingest"], run, "--inputs", str(corpus), "--docs-per-shard", "100")
    run_uninterrupted(framelm_argv(["ingest"], ref, "--inputs", str(corpus), "--docs-per-shard", "100"), ref)

    first = start(argv)
    assert wait_for_lock(first, run, timeout_s=60) is not None
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        # Another config too: were it not refused, it would clear the first run's folder.
        second = subprocess.run(framelm_argv(["ingest"], run, "--inputs", str(corpus), "--docs-per-shard", "7"),
                                capture_output=True, text=True, env=subprocess_env(), timeout=60)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert f"framelm: error: another framelm process (pid {first.pid}" in second.stderr
    assert "is running stage 'ingest'" in second.stderr

    code, _, err = finish(first, timeout_s=120)
    assert code == 0, err
    assert_same_outputs(run, ref, "ingest")
    record = json.loads((run / "manifest.json").read_text())["stages"]["ingest"]
    assert record["status"] == "done" and record["config"]["docs_per_shard"] == 100
