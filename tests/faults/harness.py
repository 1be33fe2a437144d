"""Kill a framelm command at seeded random points, restart it until it completes, and check
that nothing partial was ever visible and that the end result equals an uninterrupted run.

The harness drives real subprocesses (`python -m framelm <stage> --run-dir RUN --quiet ...`).
A kill point follows the stage's own progress: after its n-th newly written path plus a short
seeded delay (see `kill_and_resume`). The whole process group is killed with SIGKILL, as an
OOM killer or a lost node would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pyarrow.parquet as pq

from framelm.fsutil import TMP_TAG
from framelm.pipeline import HASH_FILE

REPO = Path(__file__).resolve().parents[2]


def framelm_argv(words: Iterable[str], run_dir: Path, *flags: str) -> list[str]:
    """The command line of one stage, as a user would type it."""
    return [sys.executable, "-m", "framelm", *words, "--run-dir", str(run_dir), "--quiet", *flags]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    return env


def _lock_holder(run_dir: Path) -> set[int]:
    """Pids named in the run directory's stage lock files."""
    pids = set()
    for lock in (run_dir / ".locks").glob("*.lock"):
        if lock.name == "manifest.lock":
            continue
        try:
            words = lock.read_text().split()
        except OSError:
            continue
        if len(words) >= 2 and words[0] == "pid" and words[1].isdigit():
            pids.add(int(words[1]))
    return pids


def start(argv: list[str]) -> subprocess.Popen:
    # A suite started in the background by a non-interactive shell (`make test &`) ignores
    # SIGINT, and an ignored signal stays ignored across exec, so the command would never see a
    # Ctrl-C. A handled signal is reset to its default in the child instead, and the child's
    # Python then turns SIGINT into KeyboardInterrupt, as under a terminal.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def wait_for_lock(proc: subprocess.Popen, run_dir: Path, timeout_s: float) -> float | None:
    """Time at which `proc` took its stage lock, or None if it exited first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.pid in _lock_holder(run_dir):
            return time.monotonic()
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{proc.args} did not take its stage lock within {timeout_s}s")


def finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} ran longer than {timeout_s}s; stderr:\n{err.decode(errors='replace')}")
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def run_uninterrupted(argv: list[str], run_dir: Path, timeout_s: float = 180) -> float:
    """Run to completion; return the seconds between taking the stage lock and exiting."""
    proc = start(argv)
    locked = wait_for_lock(proc, run_dir, timeout_s)
    code, out, err = finish(proc, timeout_s)
    assert code == 0, f"{' '.join(argv)} failed with exit code {code}:\n{err}"
    assert locked is not None, "the stage never took its lock: was it already up to date?"
    return time.monotonic() - locked


@dataclass
class FaultReport:
    """What happened to one command under fault injection."""

    landed: list[tuple[int, float]] = field(default_factory=list)  # (new paths written, extra delay) at each kill
    missed: int = 0  # kill points the process outran (it finished first)
    attempts: int = 0


def _written_paths(run_dir: Path) -> set[Path]:
    """What the stage itself wrote under the run directory: not the locks, the manifest or
    run_stage's config-hash marker, which appear before the stage's work starts."""
    found: set[Path] = set()
    for dirpath, _, filenames in os.walk(run_dir):  # tolerates folders the stage removes mid-walk
        for name in filenames:
            p = Path(dirpath) / name
            if ".locks" not in p.parts and not name.startswith(("manifest.json", HASH_FILE)):
                found.add(p)
    return found


def kill_and_resume(argv: list[str], run_dir: Path, reference: Path, *, seed: int, kill_points: int,
                    max_delay_s: float = 0.2, timeout_s: float = 180) -> FaultReport:
    """SIGKILL `argv` at `kill_points` seeded moments, restarting each time, then let it finish.

    A kill point is "after the stage has written its n-th new path (temporaries included), plus
    a delay of up to `max_delay_s`", n drawn from the first half of the paths the uninterrupted
    run in `reference` added: tied to the stage's own progress, so it lands mid-work however
    loaded or fast the machine is. After every kill the run directory is checked with
    `assert_nothing_partial_visible` against `reference`.
    """
    rng = random.Random(seed)
    report = FaultReport()
    start_paths = {p.relative_to(run_dir) for p in _written_paths(run_dir)}
    added = len({p.relative_to(reference) for p in _written_paths(reference)} - start_paths)
    for _ in range(kill_points):
        n_writes, delay = rng.randint(1, max(1, added // 2)), rng.uniform(0.0, max_delay_s)
        before = _written_paths(run_dir)
        proc = start(argv)
        report.attempts += 1
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and len(_written_paths(run_dir) - before) < n_writes:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"{' '.join(argv)} wrote nothing new within {timeout_s}s")
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            report.landed.append((n_writes, round(delay, 3)))
        else:
            report.missed += 1
            code, _, err = finish(proc, timeout_s)
            assert code == 0, f"{' '.join(argv)} failed after a restart with exit code {code}:\n{err}"
        assert_nothing_partial_visible(run_dir, reference)
    proc = start(argv)
    report.attempts += 1
    code, _, err = finish(proc, timeout_s)
    assert code == 0, f"{' '.join(argv)} failed on the final restart with exit code {code}:\n{err}"
    return report


def assert_nothing_partial_visible(run_dir: Path, reference: Path) -> None:
    """Every Parquet/JSON file under a final name is complete; every `.done` marker stands
    beside a file identical to the uninterrupted run's."""
    for path in sorted(run_dir.rglob("*")):
        if not path.is_file() or TMP_TAG in path.name or ".locks" in path.parts:
            continue
        rel = path.relative_to(run_dir)
        if path.suffix == ".parquet":
            try:
                pq.read_table(path)
            except Exception as exc:  # any failure to read is a partial file under a final name
                raise AssertionError(f"{rel} is visible under its final name but unreadable: {exc}") from None
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except ValueError as exc:
                raise AssertionError(f"{rel} is visible under its final name but not valid JSON: {exc}") from None
        elif path.name.startswith(".") and path.name.endswith(".done"):
            shard = path.with_name(path.name[1: -len(".done")])
            assert shard.is_file(), f"{rel} marks a shard that does not exist"
            twin = reference / shard.relative_to(run_dir)
            if twin.is_file():
                assert digest(shard) == digest(twin), f"{rel} marks a shard that differs from the uninterrupted run's"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_digests(root: Path, ignore: Callable[[Path], bool] = lambda rel: False) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`, minus those `ignore(rel)` accepts."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not ignore(rel):
            out[str(rel)] = digest(path)
    return out


def assert_same_outputs(run_dir: Path, reference: Path, key: str, ignore: Callable[[Path], bool] = lambda rel: False) -> None:
    """The stage folder `key` holds exactly the same files, byte for byte, in both run dirs,
    and no temporary file is left anywhere in `run_dir`."""
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob(f"*{TMP_TAG}*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    got, want = tree_digests(run_dir / key, ignore), tree_digests(reference / key, ignore)
    assert want, f"the uninterrupted run wrote nothing under {key}"
    assert sorted(got) == sorted(want), f"different files under {key}: only here {sorted(set(got) - set(want))}, only in the reference {sorted(set(want) - set(got))}"
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"files under {key} differ from the uninterrupted run: {differ}"
