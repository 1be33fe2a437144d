"""Helpers for the hostile-input suite: run the real CLI in-process and check that a failure is
a clean user error and that nothing half-written is left under a final name."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest

from framelm.cli import main
from framelm.fsutil import TMP_TAG


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def framelm_cli(capsys):
    """`framelm_cli("ingest", "--run-dir", d, ...)` runs `framelm` as a user would; a bug
    (any exception other than FramelmError) propagates with its traceback and fails the test."""

    def run(*argv: str | Path) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def assert_user_error(result: CliResult, *fragments: str) -> str:
    """Exit code 2, one `framelm: error:` line naming every fragment, no traceback."""
    assert result.code == 2, f"exit code {result.code}, stderr:\n{result.err}"
    assert "Traceback" not in result.err, result.err
    lines = [ln for ln in result.err.splitlines() if ln.startswith("framelm: error:")]
    assert len(lines) == 1, f"expected one 'framelm: error:' line, got:\n{result.err}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    _log_observed(lines[0])
    return lines[0]


def _log_observed(message: str) -> None:
    """With FRAMELM_RELIABILITY_LOG set, append the checked message (the source of RELIABILITY.md)."""
    log = os.environ.get("FRAMELM_RELIABILITY_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(log, "a") as fh:
            fh.write(json.dumps({"test": test, "message": message}) + "\n")


def assert_nothing_half_written(run_dir: Path, key: str) -> None:
    """After a failed stage: no temporaries anywhere, every Parquet/JSON file in the stage's
    folder readable, the stage not recorded as 'done'."""
    leftovers = [str(p) for p in run_dir.rglob(f"*{TMP_TAG}*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    for path in (run_dir / key).rglob("*"):
        if path.suffix == ".parquet" and path.is_file():
            pq.read_table(path)
        elif path.suffix == ".json" and path.is_file():
            json.loads(path.read_text())
        elif path.name.startswith(".") and path.name.endswith(".done"):
            assert path.with_name(path.name[1:-5]).is_file(), f"{path} marks a missing shard"
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        record = json.loads(manifest.read_text())["stages"].get(key)
        assert not record or record["status"] != "done", f"stage {key} is recorded as done after failing"


def write_jsonl(path: Path, records: list[dict | str | bytes]) -> Path:
    """One line per record: dicts as JSON, str/bytes written verbatim (for broken lines)."""
    with open(path, "wb") as fh:
        for r in records:
            line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            fh.write(line + b"\n")
    return path


@contextlib.contextmanager
def mounted(kind: str, target: Path, options: str, source: str | None = None) -> Iterator[None]:
    """Mount a file system for the duration of a test (tests run as root in CI and on the
    project's machines); skip where mounting is not permitted."""
    target.mkdir(parents=True, exist_ok=True)
    argv = ["mount", "-t", kind, "-o", options, source or kind, str(target)] if kind != "bind" else \
        ["mount", "--bind", "-o", options, str(source), str(target)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount ({exc})")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=10)
