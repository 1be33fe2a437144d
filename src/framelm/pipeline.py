"""Running stages: skip what is up to date, resume what was interrupted, record the rest.

A stage run is identified by its key (`train/frame/seed0`) and its hash: the hash of its
result-relevant config plus the hashes of the upstream records it reads. The same hash and a
finished record means nothing to do. A different hash means the stage's folder holds outputs
of another config: a finished result is set aside in RUN/.previous/<key> (removed once the new
run finishes), so a re-run that fails on bad input puts it back and loses nothing (the ranks of
a distributed run leave it set aside, since others may still be writing), and a later run with
the old config takes it back instead of recomputing it. The same hash without a
finished record means an interrupted run; the folder is kept so the stage can skip its finished
shards. Every upstream record must itself be current (made from the records now in the
manifest), or the stage refuses to run on stale inputs. A stage may read one part of an
upstream result (`export#frame`: one schedule's stream), whose hash that record's counts give,
so that re-running the upstream for another part leaves it up to date. A stage that remakes
what it reads (compare re-trains replaced runs) is recorded with the hash of what it leaves.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from framelm import fsutil
from framelm.config import ConfigError, StageConfig, load_yaml, stable_hash, apply_override
from framelm.errors import FramelmError
from framelm.rundir import INVOCATION, RunDir, package_versions
from framelm.stages import ORDER, STAGES

log = logging.getLogger("framelm")

HASH_FILE = ".framelm-hash"
RECORD_FILE = ".framelm-record.json"  # beside a set-aside result: the manifest record it had
PREVIOUS = ".previous"
PIPELINE_KEYS = {"run_dir", "stages"}


# "export#frame": the part of the export stage's result that training on schedule frame reads.
# A stage may depend on one part of an upstream result (its record's counts["parts"] gives each
# part's hash), so that re-running the upstream for another part does not make it stale.
PART = "#"

# Whether the stage now running was forced: a stage that runs others through run_stage (compare's
# trainings) forces them too, or `--force` would re-tabulate old models and retrain nothing.
FORCED: contextvars.ContextVar[bool] = contextvars.ContextVar("framelm_forced", default=False)


def stage_key(name: str, cfg: StageConfig) -> str:
    inst = cfg.instance()
    if inst and (inst.startswith("/") or any(part in ("", ".", "..") for part in inst.split("/"))):
        # the key names the folder run_stage clears: "../ingest" would wipe another stage's outputs
        raise ConfigError(f"{name}: the run name {inst!r} must be a relative folder name without '.', '..' or "
                          f"empty parts (outputs go to RUN/{name}/<name>), e.g. frame/seed0")
    return f"{name}/{inst}" if inst else name


def upstream_keys(name: str, cfg: StageConfig) -> tuple[str, ...]:
    declared = getattr(cfg, "upstream", None)
    keys = declared() if callable(declared) else None
    return tuple(keys) if keys is not None else STAGES[name].after


def stage_hash(name: str, cfg: StageConfig, run: RunDir, dry_run: bool = False,
               planned: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    if dry_run:
        upstream = {k: _planned_hash(run, k, planned or {}) for k in upstream_keys(name, cfg)}
    else:
        upstream = {k: _required_hash(run, k) for k in upstream_keys(name, cfg)}
        _require_current(run, list(upstream))
    payload = {"stage": name, "config": cfg.hashed_dict(), "upstream": upstream}
    fingerprint = getattr(cfg, "input_fingerprint", None)
    if callable(fingerprint):  # a stage that reads whatever exists (report) re-runs when that changes
        payload["inputs"] = fingerprint(run)
    return stable_hash(payload), upstream


def _part_hash(record: dict[str, Any] | None, part: str) -> str | None:
    """The hash a finished record gives one named part of its result (counts["parts"])."""
    if not record or record.get("status") != "done":
        return None
    if not part:
        return record.get("hash")
    return ((record.get("counts") or {}).get("parts") or {}).get(part)


def _required_hash(run: RunDir, key: str) -> str:
    base, _, part = key.partition(PART)
    rec = run.require(base)
    h = _part_hash(rec, part)
    if h is None:
        parts = ", ".join((rec.get("counts") or {}).get("parts") or {}) or "none"
        raise FramelmError(f"stage '{base}' in {run.root} holds no '{part}' (it holds: {parts}); re-run it so that it "
                           f"makes '{part}' (for training: export that schedule in the stream format): "
                           f"{run.command_for(base)}")
    return h


def _planned_hash(run: RunDir, key: str, planned: dict[str, str]) -> str:
    """The upstream hash a dry run assumes: an upstream stage that would run first gives its new
    record the hash it was planned with (a part's hash is known only once it has run)."""
    base, _, part = key.partition(PART)
    if base in planned:
        return planned[base] + (f"{PART}{part}" if part else "")
    return _part_hash(run.record(base), part) or "not-run-yet"


def stale_records(run: RunDir, keys: list[str] | None = None) -> list[tuple[str, str]]:
    """(key, upstream) for each record among `keys` (default: every record) and the records they
    were made from, whose `upstream` has since been re-run with another result."""
    stages = run.manifest()["stages"]
    keys = list(stages) if keys is None else [k.partition(PART)[0] for k in keys]
    seen: set[str] = set()
    stale = []
    while keys:
        key = keys.pop()
        if key in seen or key not in stages:
            continue
        seen.add(key)
        for up, used in (stages[key].get("upstream") or {}).items():
            base, _, part = up.partition(PART)
            if _part_hash(stages.get(base), part) != used:
                stale.append((key, base))
            else:
                keys.append(base)
    return stale


def _require_current(run: RunDir, keys: list[str]) -> None:
    """Refuse upstream records made from inputs that have since been re-run with another result:
    after `framelm ingest` on new files, an old `score` would otherwise feed `partition` silently."""
    stale = stale_records(run, keys)
    if stale:
        key, up = stale[0]
        raise FramelmError(f"stage '{key}' in {run.root} is out of date: it was made from another result of "
                           f"'{up}' than the one there now; re-run it first: {run.command_for(key)}")


def run_stage(name: str, cfg: StageConfig, run: RunDir | str | Path, *, force: bool = False, dry_run: bool = False,
              planned: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one stage unless it is up to date; return its counts. A dry run of several stages
    shares `planned` (key -> hash of each that would run), so that it sees what a re-run
    upstream makes re-run downstream."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    key = stage_key(name, cfg)
    distributed = getattr(cfg, "world_size", 1) > 1
    if force and distributed:
        # Every rank would clear the stage's folder, deleting shards the other ranks finished.
        raise FramelmError(f"{key}: --force cannot be given to the {cfg.world_size} ranks of a distributed run; "
                           f"to start over, delete {run.path(key)} and launch the ranks without --force")
    if dry_run:
        planned = {} if planned is None else planned
        rec, h, status = _dry_run_status(name, cfg, run, force, planned)
        print(f"# {key}: {status}; hash {h}")
        owned = getattr(cfg, "owned_stages", None)
        for owned_name, owned_cfg in owned() if callable(owned) else ():
            # the runs it makes through run_stage (compare's trainings), each skipped when up to date
            print(f"#   {stage_key(owned_name, owned_cfg)}: {_dry_run_status(owned_name, owned_cfg, run, force, planned)[2]}")
        print(yaml.safe_dump({name: cfg.to_dict()}, sort_keys=False))
        return rec.get("counts", {}) if key not in planned and rec else {}
    h, upstream = stage_hash(name, cfg, run)
    rec = run.record(key)
    if not force and _finished(rec, h):
        log.info("%s: up to date (hash %s), skipping", key, h)
        return rec.get("counts", {})

    lock_name = getattr(cfg, "lock_name", lambda k: k)(key)
    with run.stage_lock(lock_name):
        out_dir, previous = run.path(key), run.path(PREVIOUS, key)
        set_aside = False
        with run._manifest_lock():
            rec = run.record(key)
            if not force and _finished(rec, h):
                # another rank of a distributed run finished it, or took back its set-aside result
                log.info("%s: up to date (hash %s), skipping", key, h)
                return rec.get("counts", {})
            marker = out_dir / HASH_FILE
            if out_dir.exists() and (force or not marker.exists() or marker.read_text().strip() != h):
                if not (marker.exists() and _finished(rec, marker.read_text().strip())):
                    run.reset_dir(out_dir)  # not a finished result: nothing to keep
                else:
                    _set_aside(out_dir, previous, rec)
                    set_aside = True
                    log.info("%s: the result of the previous config is kept in %s until this run finishes",
                             key, previous)
            restored = _take_back(run, key, out_dir, previous) if not force and not out_dir.exists() and _hash_of(previous) == h else None
            if restored is None:
                out_dir.mkdir(parents=True, exist_ok=True)
                fsutil.clean_temporaries(out_dir)
                fsutil.write_text(marker, h + "\n")
        if restored is not None:
            log.info("%s: the result set aside for this config (hash %s) is back in place, skipping", key, h)
            return restored.get("counts", {})
        started = time.time()
        running = {"stage": name, "status": "running", "hash": h, "upstream": upstream,
                   "config": cfg.to_dict(), "started": started, "versions": package_versions()}
        if INVOCATION.get():
            running["command"] = INVOCATION.get()
        run.update_record(key, running)
        log.info("%s: running (hash %s)", key, h)
        try:
            forced = FORCED.set(force)
            try:
                counts = STAGES[name].entry()(cfg, run) or {}
            finally:
                FORCED.reset(forced)
            if getattr(cfg, "remakes_inputs", False) and not counts.get("_pending"):
                # It remade what it read (compare re-trains the runs a standalone `framelm train`
                # replaced): it is recorded as what it leaves, or the same replacement made again
                # would give back the hash recorded here and pass for up to date.
                h = stage_hash(name, cfg, run)[0]
                fsutil.write_text(marker, h + "\n")
                log.info("%s: recorded with hash %s, that of the inputs it leaves", key, h)
        except FramelmError as exc:
            if set_aside and not distributed:  # this invocation's partial work is all that is lost
                with run._manifest_lock():
                    run.reset_dir(out_dir)
                    _take_back(run, key, out_dir, previous)
                exc.args = (f"{exc.args[0] if exc.args else exc}\n(the previous result of {key} is unchanged)",)
            else:
                run.update_record(key, {**running, "status": "failed", "error": str(exc)})
                if distributed and _hash_of(previous):
                    # Other ranks may still be writing into out_dir, so the previous result stays
                    # set aside; a run of its config takes it back.
                    exc.args = (f"{exc.args[0] if exc.args else exc}\n(the previous result of {key} is kept in "
                                f"{previous}; running its command again puts it back)",)
            raise
        except KeyboardInterrupt:
            if not distributed:  # the ranks still running would be described as stopped
                # what it finished stays; the same command resumes from it
                run.update_record(key, {**running, "status": "interrupted"})
            raise
        if counts.get("_pending"):
            # A distributed rank finished its share; another rank completes the stage.
            log.info("%s: this process's share is done; the stage completes when all ranks finish", key)
            return counts
        run.update_record(key, {**running, "status": "done", "hash": h, "seconds": round(time.time() - started, 3),
                                "counts": counts})
        with run._manifest_lock():  # set-asides of other keys are made under it
            _drop_set_aside(run, previous)
    log.info("%s: done in %.1fs", key, time.time() - started)
    return counts


def _dry_run_status(name: str, cfg: StageConfig, run: RunDir, force: bool,
                    planned: dict[str, str]) -> tuple[dict[str, Any] | None, str, str]:
    """What a run would do: (record, hash, what to say). A stage that would run goes into `planned`."""
    key = stage_key(name, cfg)
    h, upstream = stage_hash(name, cfg, run, True, planned)
    rec = run.record(key)
    up_to_date = not force and _finished(rec, h)
    if up_to_date and planned and not upstream_keys(name, cfg) and callable(getattr(cfg, "input_fingerprint", None)):
        # it reads whatever the run holds (report), which the stages planned before it remake
        up_to_date = False
    if up_to_date:
        return rec, h, "up to date (would skip)"
    planned[key] = h
    undecided = sorted({k.partition(PART)[0] for k in upstream if PART in k and k.partition(PART)[0] in planned})
    if undecided and not force and rec and rec.get("status") == "done":  # else it runs whatever the part holds
        return rec, h, f"would run unless what it reads of {', '.join(undecided)} comes out unchanged"
    return rec, h, "would run"


def _finished(rec: dict[str, Any] | None, h: str) -> bool:
    """Whether a manifest record is a finished run of the config with hash `h`."""
    return bool(rec and rec.get("status") == "done" and rec.get("hash") == h)


def _hash_of(folder: Path) -> str | None:
    """The config hash of a set-aside result, or None if there is none."""
    marker, record = folder / HASH_FILE, folder / RECORD_FILE
    return marker.read_text().strip() if marker.is_file() and record.is_file() else None


def _set_aside(out_dir: Path, previous: Path, record: dict[str, Any]) -> None:
    if previous.exists():
        shutil.rmtree(previous)
    fsutil.write_json(out_dir / RECORD_FILE, record)
    previous.parent.mkdir(parents=True, exist_ok=True)
    out_dir.rename(previous)


def _drop_set_aside(run: RunDir, previous: Path) -> None:
    """Delete a set-aside result and the folders it leaves empty, RUN/.previous included."""
    run.reset_dir(previous)
    _remove_empty_parents(run, previous)


def _remove_empty_parents(run: RunDir, previous: Path) -> None:
    top = run.path(PREVIOUS)
    folder = previous.parent
    while folder != top.parent and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _take_back(run: RunDir, key: str, out_dir: Path, previous: Path) -> dict[str, Any]:
    """Move a set-aside result back under its key with the manifest record it had, and return
    that record. The caller holds the manifest lock, so that no other process (a rank with its
    own stage lock) sees the folder back without its record and takes it for an interrupted run."""
    record = fsutil.read_json(previous / RECORD_FILE)
    (previous / RECORD_FILE).unlink()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    previous.rename(out_dir)
    _remove_empty_parents(run, previous)
    run._write_record(key, record)
    return record


def build_config(name: str, data: dict[str, Any] | None) -> StageConfig:
    return STAGES[name].config_class().from_dict(data or {}, where=name)


def load_pipeline(path: str | Path, overrides: list[str] = (), *,
                  need_run_dir: bool = True) -> tuple[Path | None, list[str], dict[str, Any]]:
    """Read a pipeline YAML: `run_dir`, optional `stages` list, and one section per stage."""
    data = load_yaml(path)
    in_file = [s for s in ORDER if s in data]
    for o in overrides:
        apply_override(data, o)
    unknown = [k for k in data if k not in PIPELINE_KEYS and k not in STAGES]
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key '{unknown[0]}'; allowed: {', '.join(sorted(PIPELINE_KEYS))} "
            f"and the stage names {', '.join(ORDER)}"
        )
    run_dir = data.get("run_dir")
    if run_dir is None and need_run_dir:
        raise ConfigError(f"{path}: missing required key 'run_dir' (the run directory, e.g. run_dir: runs/my-corpus)")
    if run_dir is not None and (not isinstance(run_dir, str) or not run_dir.strip()):
        raise ConfigError(f"{path}: 'run_dir' must be the path of the run directory, e.g. run_dir: runs/my-corpus; "
                          f"got {run_dir!r}")
    stages = data.get("stages") or in_file
    if not isinstance(stages, list) or any(s not in STAGES for s in stages):
        bad = [s for s in stages if s not in STAGES] if isinstance(stages, list) else stages
        raise ConfigError(f"{path}: 'stages' must be a list of stage names from {', '.join(ORDER)}; got {bad!r}")
    for o in overrides:
        head = o.split("=", 1)[0].strip().split(".")[0]
        if head in STAGES and head not in stages:
            # Adding the stage would run it with defaults for every other key; ignoring the
            # override would run the pipeline without the setting the user asked for.
            owners = [f"{s}.{o.strip()}" for s in stages
                      if head in {f.name for f in dataclasses.fields(STAGES[s].config_class())}]
            raise ConfigError(f"override '{o}': {path} does not run stage '{head}' (it runs {', '.join(stages)})"
                              + (f"; did you mean {owners[0]}?" if owners else ""))
    # Relative paths, run_dir included, are relative to the working directory, as on the command line.
    return (Path(run_dir).expanduser() if run_dir is not None else None), stages, data


def run_pipeline(path: str | Path, overrides: list[str] = (), *, only: list[str] | None = None,
                 force: bool = False, dry_run: bool = False) -> dict[str, dict[str, Any]]:
    run_dir, stages, data = load_pipeline(path, overrides)
    missing = [s for s in only or () if s not in stages]
    if missing:
        raise ConfigError(f"--only {' '.join(missing)}: {path} does not run {', '.join(map(repr, missing))}; "
                          f"its stages are {', '.join(stages)}")
    configs = {s: build_config(s, data.get(s)) for s in stages}  # validate everything before running anything
    _refuse_shared_outputs(path, stages, configs)
    run = RunDir(run_dir)
    results: dict[str, dict[str, Any]] = {}
    planned: dict[str, str] = {}
    for s in stages:
        if only and s not in only:
            continue
        results[s] = run_stage(s, configs[s], run, force=force, dry_run=dry_run, planned=planned)
    return results


def _refuse_shared_outputs(path: str | Path, stages: list[str], configs: dict[str, StageConfig]) -> None:
    """Two sections that make one stage key with different settings (a `train:` section and
    compare's own run of that schedule and seed) would replace each other's result on every run."""
    made: dict[str, tuple[str, StageConfig]] = {}
    for s in stages:
        owned = getattr(configs[s], "owned_stages", None)
        for name, cfg in [(s, configs[s]), *(owned() if callable(owned) else [])]:
            key = stage_key(name, cfg)
            first, other = made.setdefault(key, (s, cfg))
            mine, theirs = other.hashed_dict(), cfg.hashed_dict()
            if mine != theirs:
                differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
                raise ConfigError(f"{path}: sections '{first}' and '{s}' both make {key}, with different settings "
                                  f"({', '.join(differ)}), so each run would replace the other's result; leave out the "
                                  f"'{first}' section or give it another schedule or seed")
