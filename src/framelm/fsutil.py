"""File writing that never leaves a partial file under its final name.

Everything framelm writes goes through `atomic_path`: the data lands in a temporary file in
the same directory, is flushed to disk, and only then renamed over the final name (rename is
atomic on POSIX within one file system). A killed process leaves at worst a `*.tmp-*` file,
which `clean_temporaries` removes on the next run. Finished shards get an empty `.NAME.done`
marker written after the shard itself, so "marker exists" implies "shard complete".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from framelm.errors import FramelmError

log = logging.getLogger("framelm")

TMP_TAG = ".tmp-"
RECENT_NS = 3_000_000_000  # see ContentHashes.fingerprint
CACHED_BYTES = 1 << 20
FOREIGN_TEMPORARY_S = 3600  # see clean_temporaries
_HOST = socket.gethostname().replace(TMP_TAG, "_")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # read-only is enough on Linux, and works on a read-only copied file
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _explain_os_error(exc: OSError, path: Path) -> FramelmError:
    if exc.errno == errno.ENOSPC:
        return FramelmError(f"no space left on the device while writing {path}; free space and re-run the same command (finished work is kept)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FramelmError(f"cannot write {path}: {exc.strerror}; choose a writable --run-dir or fix its permissions")
    return FramelmError(f"cannot write {path}: {exc}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to `path`.

    On any exception the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _explain_os_error(exc, path.parent) from None
    tmp = path.with_name(f"{path.name}{TMP_TAG}{_HOST}-{os.getpid()}")
    try:
        yield tmp
        # Durable before the rename makes it visible: after a power loss a complete-looking
        # file or folder (a checkpoint) must not hold empty files.
        if tmp.is_dir():
            for written in tmp.rglob("*"):
                (_fsync_file if written.is_file() else _fsync_dir)(written)
            _fsync_dir(tmp)
        elif tmp.is_file():
            _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _remove(tmp)
        raise _explain_os_error(exc, path) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    import yaml

    write_text(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=None))


def write_parquet(path: str | Path, table: Any, **kwargs: Any) -> None:
    """Write a pyarrow Table atomically (zstd-compressed unless told otherwise)."""
    import pyarrow.parquet as pq

    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def done_marker(path: str | Path) -> Path:
    """`.NAME.done` beside NAME: hidden, so that pyarrow, pandas and DuckDB read a folder of
    finished shards as a dataset (they skip names that start with '.' or '_')."""
    path = Path(path)
    return path.with_name(f".{path.name}.done")


def is_done(path: str | Path) -> bool:
    return done_marker(path).exists() and Path(path).exists()


def mark_done(path: str | Path) -> None:
    write_bytes(done_marker(path), b"")


def clean_temporaries(directory: str | Path) -> int:
    """Remove temporaries left by killed processes under `directory`; return how many.

    Temporaries of processes that may still be writing (other ranks of a distributed stage) are
    kept: those of live processes on this machine, and those another machine touched in the last
    FOREIGN_TEMPORARY_S seconds (its processes cannot be seen from here). Containers that share a
    host name but not a PID namespace look dead to each other: give them distinct host names.
    """
    directory = Path(directory)
    if not directory.exists():
        return 0
    n = 0
    for p in directory.rglob(f"*{TMP_TAG}*"):
        if not _writer_may_be_running(p):
            _remove(p)
            n += 1
    return n


def _writer_may_be_running(path: Path) -> bool:
    host, _, pid = path.name.rpartition(TMP_TAG)[2].rpartition("-")
    if not (host and pid.isdigit()):
        return False  # not named by atomic_path: a fixed-name scratch file of a finished process
    if host != _HOST:
        try:
            return time.time() - path.stat().st_mtime < FOREIGN_TEMPORARY_S
        except OSError:
            return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


class ContentHashes:
    """Full-content SHA-256 of input files, remembered in a JSON cache by path, size, mtime, ctime
    and inode: an unchanged file costs one stat, and any change (an edit, a copy, `touch`) re-hashes
    it, so a stage re-runs when and only when the bytes it reads differ.

    Only files of at least CACHED_BYTES are remembered (re-reading a small file costs about what a
    cache entry does), so a folder of a million small documents does not bloat the cache. The
    cache is an optimisation only: losing it (or a concurrent writer's entries) costs a re-hash,
    never a wrong answer.
    """

    def __init__(self, cache_path: str | Path):
        self.cache_path = Path(cache_path)
        self._entries: dict[str, list] = {}
        self._new: dict[str, list] = {}
        if self.cache_path.is_file():
            try:
                self._entries = json.loads(self.cache_path.read_text())
            except (OSError, json.JSONDecodeError):
                self._entries = {}

    def fingerprint(self, path: str | Path) -> dict[str, Any]:
        """{"path", "bytes", "sha256"} of one file."""
        path = Path(path)
        try:
            return self._fingerprint(path)
        except OSError as exc:
            raise FramelmError(f"cannot read {path}: {exc.strerror or exc}") from None

    def _fingerprint(self, path: Path) -> dict[str, Any]:
        st = path.stat()
        key = str(path.resolve())
        # ctime too: `cp -p` onto an existing file keeps its inode, size and mtime, never its ctime.
        stat_id = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = self._new.get(key) or self._entries.get(key)
        if not (isinstance(entry, list) and entry[:4] == stat_id):
            if st.st_size >= 1 << 30:
                log.info("hashing %s (%.1f GB) to tell whether it changed", path, st.st_size / 1e9)
            entry = [*stat_id, sha256_file(path)]
            # A file modified within the last seconds may change again without its times moving
            # (timestamp granularity), so its hash is not remembered yet (as git does).
            if st.st_size >= CACHED_BYTES and time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RECENT_NS:
                self._new[key] = entry
        return {"path": str(path), "bytes": st.st_size, "sha256": entry[4]}

    def save(self) -> None:
        """Merge this process's new hashes into the cache file (atomically)."""
        if not self._new:
            return
        current = ContentHashes(self.cache_path)._entries
        current.update(self._new)
        write_json(self.cache_path, current)
        self._entries, self._new = current, {}


def model_dir_fingerprint(directory: Path, hashes: ContentHashes) -> dict[str, str]:
    """Content hashes of a model folder's files (weights, config, tokenizer; not subfolders)."""
    if not directory.is_dir():
        return {}
    return {p.name: hashes.fingerprint(p)["sha256"] for p in sorted(directory.iterdir()) if p.is_file()}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, remedy: str = "") -> dict[str, Any]:
    """A JSON object read from `path`. A missing, unreadable or malformed file, or one holding
    something else than an object, raises a FramelmError that names the file (and the line and
    column of a syntax error), followed by `remedy`: what the user should do about it."""
    path = Path(path)
    suffix = f"; {remedy}" if remedy else ""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FramelmError(f"{path} not found{suffix}") from None
    except OSError as exc:
        raise FramelmError(f"cannot read {path}: {exc.strerror or exc}{suffix}") from None
    except json.JSONDecodeError as exc:
        raise FramelmError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}){suffix}") from None
    except UnicodeDecodeError as exc:
        raise FramelmError(f"{path}: not UTF-8 text ({exc}){suffix}") from None
    if not isinstance(data, dict):
        raise FramelmError(f"{path}: expected a JSON object, found {type(data).__name__}{suffix}")
    return data


def read_log(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs of a JSON-lines log (a training run's log.jsonl); an unfinished
    last line (a run still writing, or killed mid-write) is skipped, a bad line elsewhere named."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if i == len(lines) and not raw.endswith(b"\n"):
                log.warning("%s: line %d is incomplete (still being written?); skipped", path, i)
                continue
            raise FramelmError(f"{path}: line {i}: invalid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise FramelmError(f"{path}: line {i}: expected a JSON object, got {type(rec).__name__}")
        out.append((i, rec))
    return out
