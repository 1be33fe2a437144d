"""File writing that never leaves a partial file under its final name.

Everything framelm writes goes through `atomic_path`: the data lands in a temporary file in
the same directory, is flushed to disk, and only then renamed over the final name (rename is
atomic on POSIX within one file system). A killed process leaves at worst a `*.tmp-*` file,
which `clean_temporaries` removes on the next run. Finished shards get an empty `*.done`
marker written after the shard itself, so "marker exists" implies "shard complete".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from framelm.errors import FramelmError

TMP_TAG = ".tmp-"


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
    tmp = path.with_name(f"{path.name}{TMP_TAG}{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
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
    path = Path(path)
    return path.with_name(path.name + ".done")


def is_done(path: str | Path) -> bool:
    return done_marker(path).exists() and Path(path).exists()


def mark_done(path: str | Path) -> None:
    write_bytes(done_marker(path), b"")


def clean_temporaries(directory: str | Path) -> int:
    """Remove temporaries left by killed processes under `directory`; return how many."""
    directory = Path(directory)
    if not directory.exists():
        return 0
    n = 0
    for p in directory.rglob(f"*{TMP_TAG}*"):
        _remove(p)
        n += 1
    return n


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Cheap identity of an input file: size, mtime and a hash of its first and last MiB."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if st.st_size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()[:16]}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
