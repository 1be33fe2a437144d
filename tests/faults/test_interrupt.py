"""Ctrl-C (SIGINT) in the middle of a stage: the CLI says how to resume and exits with 130,
leaves no temporary file behind, and the same command then finishes byte-identical to an
uninterrupted run."""

from __future__ import annotations

import os
import signal
import time

from .harness import (assert_nothing_partial_visible, assert_same_outputs, finish, framelm_argv, run_uninterrupted,
                      start)
from .test_concurrent_runs import write_corpus


def test_ctrl_c_mid_stage_then_resume(tmp_path):
    corpus = write_corpus(tmp_path / "web.jsonl")
    ref, run = tmp_path / "ref", tmp_path / "run"
    # 2000 one-document shards (about a second of writing): after the third the stage is far from
    # done. The process is stopped before it is signalled, so that the check that it is mid-stage
    # holds when the signal lands (a run that finishes first exits 0 and the test would say why).
    flags = ("--inputs", str(corpus), "--docs-per-shard", "1")
    run_uninterrupted(framelm_argv(["ingest"], ref, *flags), ref)

    proc = start(framelm_argv(["ingest"], run, *flags))
    docs = run / "ingest" / "documents"
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(list(docs.glob("*.done")) if docs.exists() else []) < 3:
        assert time.monotonic() < deadline, "ingest wrote no shard within 120 s"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    done = len(list(docs.glob("*.done")))
    assert proc.poll() is None and done < 2000, f"ingest finished its {done} shards before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    code, _, err = finish(proc, timeout_s=60)
    assert code == 130, err
    assert "framelm: interrupted; re-run the same command to resume" in err and "Traceback" not in err
    assert not list(run.rglob("*.tmp-*")), "an interrupted run must remove its own temporaries"
    assert_nothing_partial_visible(run, ref)

    code, _, err = finish(start(framelm_argv(["ingest"], run, *flags)), timeout_s=120)
    assert code == 0, err
    assert_same_outputs(run, ref, "ingest")
