"""A full disk and a read-only run directory, both simulated (a patched `os.replace` raising
ENOSPC / EROFS at a chosen write) and real (a size-capped tmpfs, a read-only bind mount, where
the machine allows mounting). Each ends in one clean error naming the path, nothing
half-written, and, once the disk has room again, a re-run equal to an uninterrupted one."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from faults.harness import tree_digests

from framelm import fsutil

from .conftest import assert_nothing_half_written, assert_user_error, mounted, write_jsonl

DOCS = [{"id": f"d{i}", "text": f"document number {i}: " + "lorem ipsum dolor sit amet " * (5 + i % 7)} for i in range(200)]


def ingest_argv(run_dir: Path, src: Path) -> list:
    return ["ingest", "--run-dir", run_dir, "--quiet", "--inputs", str(src), "--docs-per-shard", "20"]


def fail_on_shard(monkeypatch, shard_name: str, err: int) -> None:
    """Make the rename that publishes `shard_name` fail with `err`, as a full or read-only disk would."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == shard_name:
            raise OSError(err, os.strerror(err), str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(fsutil.os, "replace", replace)


@pytest.mark.parametrize("err, message", [
    (errno.ENOSPC, "no space left on the device while writing"),
    (errno.EROFS, "Read-only file system; choose a writable --run-dir"),
    (errno.EACCES, "Permission denied; choose a writable --run-dir"),
])
def test_write_failure_mid_stage_then_resume(framelm_cli, tmp_path, monkeypatch, err, message):
    src = write_jsonl(tmp_path / "web.jsonl", DOCS)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert framelm_cli(*ingest_argv(ref, src)).code == 0

    with monkeypatch.context() as m:
        fail_on_shard(m, "part-00004.parquet", err)
        result = framelm_cli(*ingest_argv(run, src))
    assert_user_error(result, message, str(run / "ingest" / "documents" / "part-00004.parquet"))
    assert_nothing_half_written(run, "ingest")
    finished = sorted(p.name for p in (run / "ingest" / "documents").iterdir())
    assert finished == sorted(name for i in range(4) for name in (f"part-{i:05d}.parquet", f".part-{i:05d}.parquet.done"))

    assert framelm_cli(*ingest_argv(run, src)).code == 0  # space freed: the same command resumes
    assert tree_digests(run / "ingest") == tree_digests(ref / "ingest")


def test_really_full_disk(framelm_cli, tmp_path):
    small = tmp_path / "small"
    src = write_jsonl(tmp_path / "web.jsonl", DOCS + [{"id": f"big{i}", "text": random.Random(i).randbytes(3000).hex()} for i in range(100)])
    with mounted("tmpfs", small, "size=160k"):
        result = framelm_cli(*ingest_argv(small / "run", src))
        assert_user_error(result, str(small / "run"))
        assert "No space left" in result.err or "no space left" in result.err, result.err
        assert_nothing_half_written(small / "run", "ingest")


def test_really_read_only_run_dir(framelm_cli, tmp_path):
    src = write_jsonl(tmp_path / "web.jsonl", DOCS)
    writable, read_only = tmp_path / "writable", tmp_path / "read-only"
    assert framelm_cli(*ingest_argv(writable, src)).code == 0
    before = tree_digests(writable)
    with mounted("bind", read_only, "ro", source=str(writable)):
        result = framelm_cli(*ingest_argv(read_only, src), "--force")
        assert_user_error(result, str(read_only), "Read-only file system")
    assert tree_digests(writable) == before


def test_unreadable_input(framelm_cli, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "web.jsonl", DOCS)
    real_open = open

    def deny(file, *args, **kwargs):  # what open() does on a mode-000 file for anyone but root
        if Path(file) == src:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(fsutil, "open", deny, raising=False)
    result = framelm_cli(*ingest_argv(tmp_path / "run", src))
    assert_user_error(result, f"cannot read {src}: Permission denied")
    assert_nothing_half_written(tmp_path / "run", "ingest")
