"""The run directory: where every stage writes, and the manifest that describes it.

Layout (each stage owns one top-level folder named after it):

    RUN/manifest.json        one record per stage run: config, hash, upstream hashes,
                             package versions, counts, timings, status
    RUN/.locks/              one lock file per running stage (concurrent-run guard)
    RUN/.cache/              content hashes of input files (fsutil.ContentHashes)
    RUN/.previous/<key>/     a finished result set aside while its stage re-runs with another
                             config (framelm.pipeline); removed once that run finishes
    RUN/<stage>/...          the stage's outputs (see each stage module's docstring)

Stages talk only through these files. The manifest is rewritten atomically under a short
lock, so several processes (e.g. score ranks) can record into it safely.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import platform
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

from framelm import fsutil, launcher
from framelm.errors import FramelmError

MANIFEST = "manifest.json"
# The command line a CLI invocation runs under ({"argv": [...], "cwd": ...}); stage records keep
# it, so a hint to re-run a stage repeats the user's own command, config file and options included.
INVOCATION: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("framelm_invocation", default=None)
RANK_FLAGS = ("--rank", "--world-size")  # one rank's share: the command that re-runs a stage has them not


def invocation(args: list[str]) -> dict[str, Any]:
    """How to repeat this command: its arguments without one rank's --rank/--world-size, under
    torchrun when torchrun started it (every rank then records the same command)."""
    words: list[str] = []
    rest = iter(args)
    for a in rest:
        if a.split("=", 1)[0] in RANK_FLAGS:
            if "=" not in a:
                next(rest, None)  # its value
            continue
        words.append(a)
    torchrun = ["torchrun", "--nproc-per-node", str(launcher.local_world_size()), "-m"] if launcher.world_size() > 1 else []
    return {"argv": [*torchrun, "framelm", *words], "cwd": os.getcwd()}


class RunDir:
    """A run directory. Paths handed out are always inside it."""

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FramelmError(f"cannot create run directory {self.root}: {exc.strerror}") from None
        elif not self.root.is_dir():
            raise FramelmError(f"run directory {self.root} does not exist; run an earlier stage first (e.g. framelm ingest --run-dir {root})")

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def path(self, *parts: str | Path) -> Path:
        """A path inside the run directory; refuses anything that would escape it."""
        p = self.root.joinpath(*map(str, parts)).resolve()
        if p != self.root and self.root not in p.parents:
            raise FramelmError(f"path {'/'.join(map(str, parts))!r} points outside the run directory {self.root}")
        return p

    @contextlib.contextmanager
    def content_hashes(self) -> Iterator[fsutil.ContentHashes]:
        """`fsutil.ContentHashes` cached in RUN/.cache, saved when the block ends."""
        hashes = fsutil.ContentHashes(self.root / ".cache" / "content-hashes.json")
        yield hashes
        hashes.save()

    def stage_dir(self, stage: str, create: bool = True) -> Path:
        p = self.path(stage)
        if create:
            p.mkdir(parents=True, exist_ok=True)
        return p

    # -- manifest -------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"stages": {}}
        return fsutil.read_json(self.manifest_path, "it was not written by framelm or was edited by hand")

    def record(self, key: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(key)

    def require(self, key: str, hint: str | None = None) -> dict[str, Any]:
        """The finished record of an upstream stage, or an error saying which command makes it."""
        rec = self.record(key)
        if not rec or rec.get("status") != "done":
            raise FramelmError(f"stage '{key}' has not finished in {self.root}; run it first: {hint or self.command_for(key)}")
        return rec

    def command_for(self, key: str) -> str:
        """The command line that makes stage run `key`: the one that last ran it, so its settings
        (a --config file, options) carry over, else the plain subcommand (train/frame/seed3: with
        its schedule and seed)."""
        from framelm.stages import STAGES

        ran = (self.record(key) or {}).get("command")
        if isinstance(ran, dict) and isinstance(ran.get("argv"), list):
            cmd = shlex.join(a for a in ran["argv"] if a != "--force")  # the new inputs make it re-run anyway
            cwd = ran.get("cwd")
            return f"(cd {shlex.quote(cwd)} && {cmd})" if isinstance(cwd, str) and cwd != os.getcwd() else cmd
        name, _, instance = key.partition("/")
        words = " ".join(STAGES[name].words) if name in STAGES else name
        cmd = f"framelm {words} --run-dir {self.root}"
        run_name = re.fullmatch(r"(.+)/seed(\d+)", instance)
        if name == "train" and run_name:
            cmd += f" --schedule {run_name[1]} --seed {run_name[2]}"
        elif name == "eval" and run_name:
            cmd += f" --model train/{instance}"
        return cmd

    def update_record(self, key: str, record: dict[str, Any]) -> None:
        with self._manifest_lock():
            self._write_record(key, record)

    def _write_record(self, key: str, record: dict[str, Any]) -> None:
        """update_record for a caller that already holds the manifest lock (flock does not nest)."""
        for stale in self.root.glob(f"{MANIFEST}{fsutil.TMP_TAG}*"):
            stale.unlink(missing_ok=True)  # left by a writer killed mid-write; writers hold this lock
        data = self.manifest()
        data.setdefault("stages", {})[key] = record
        data["framelm_version"] = package_versions()["framelm"]
        fsutil.write_json(self.manifest_path, data)

    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        with _open_lock_file(self.root / ".locks" / "manifest.lock") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- concurrent-run guard ---------------------------------------------------------------
    @contextlib.contextmanager
    def stage_lock(self, key: str) -> Iterator[None]:
        """Hold an exclusive lock for one stage run; a second process gets a clear error.

        The lock is an OS advisory lock (flock), so it is released when the holder dies, even
        by SIGKILL: a killed run never blocks its own restart.
        """
        fh = _open_lock_file(self.root / ".locks" / (key.replace("/", "__") + ".lock"))
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise FramelmError(
                f"another framelm process ({holder}) is running stage '{key}' in {self.root}; "
                f"wait for it to finish or use another --run-dir"
            ) from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {platform.node()}")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def reset_dir(self, path: Path) -> None:
        """Delete a stage output folder inside the run directory (for a changed config)."""
        path = self.path(path.relative_to(self.root))
        if path == self.root:
            raise FramelmError("refusing to delete the whole run directory")
        if path.exists():
            shutil.rmtree(path)


def _open_lock_file(path: Path):
    """Open (creating) a lock file; a read-only or full run directory is a user error."""
    try:
        path.parent.mkdir(exist_ok=True)
        return open(path, "a+")
    except OSError as exc:
        raise FramelmError(f"cannot write {path}: {exc.strerror}; choose a writable --run-dir or fix its permissions") from None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("framelm", "torch", "transformers", "tokenizers", "pyarrow", "numpy", "duckdb"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
