"""The export plan of one schedule: which tokens go where, in which order, in which segment.

Reads RUN/schedule/<name>/{order.parquet,stages.yaml} and RUN/tokenize/{tokens.bin,
index.parquet,meta.json}; writes RUN/export/<name>/plan/ (one .npy column per scheduled
document: `offset` in tokens.bin, `length` incl. EOS, `stage`, `start` in the exported stream;
`inputs.json`, the fingerprints of the inputs the plan was built from) and
RUN/export/<name>/segments.json (the segment table, below).

Every format writes the same stream: the schedule's documents in `position` order, each
followed by its EOS. The plan turns order.parquet into per-document columns once (a DuckDB join,
out of core) so that any token range of the stream can be read without reading what precedes it.

Segments. Formats that cannot ramp a mixture (Megatron, nanotron, plain text) get the stream cut
into consecutive fixed-mix segments: a pure stretch of one stage, or one of `n_substages` slices
of a transition window. A transition window between stage s and s+1 is read from the order
itself: it starts at the first document of a later stage and ends after the last document of
stage s or earlier, so it is exactly where the schedule interleaved the two (overlapping windows
merge). Cuts fall on document starts; each slice records the token share of every stage in it.

Steps. The step-driven formats (Megatron, nanotron) train each segment from a dataset of its own,
so a segment gets the whole steps that dataset can feed without a second epoch, not the steps
its stream position spans: a trainer cuts a dataset of T tokens into samples of seq_len + 1
tokens (inputs and targets), `StepRule.samples` of them (Megatron: (T - 1) // seq_len, samples
sharing one token; nanotron: T // (seq_len + 1), disjoint), and a step takes global_batch of
them. Phases follow one another with no gap; what a segment holds beyond its whole steps (less
than one step's samples, and the shared last token) is not trained. Each segment too short for
one step first merges with a neighbour (`ExportPlan.step_segments`), else it would get no step.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import yaml

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.progress import progress_bar
from framelm.rundir import RunDir
from framelm.tokenstore import StageRange, TokenStore, check_stages

log = logging.getLogger("framelm")

PLAN_COLUMNS = {"offset": np.int64, "length": np.int64, "stage": np.int32, "start": np.int64}
# Mean document length (tokens) from which a read copies document slices one by one instead of
# gathering through a per-token index (measured crossover on a 2-core x86 machine: ~30-60).
LOOP_MIN_MEAN_TOKENS = 48
# Documents per piece when a format writer streams per-document columns (bounds its memory).
INDEX_CHUNK_DOCS = 1 << 20


@dataclass(frozen=True)
class Segment:
    """A fixed-mix stretch of the stream: documents [first_doc, end_doc), tokens [start, end)."""

    index: int
    name: str
    kind: str  # "stage", "transition", or "merged" (segments too short for a step: ExportPlan.step_segments)
    first_doc: int
    end_doc: int
    start_token: int
    end_token: int
    mix: dict[str, float]  # stage name -> share of this segment's tokens

    @property
    def folder(self) -> str:
        """A file-system-safe name that sorts in stream order."""
        return f"{self.index:03d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.name)}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "folder": self.folder, "kind": self.kind,
                "first_doc": self.first_doc, "end_doc": self.end_doc, "docs": self.end_doc - self.first_doc,
                "start_token": self.start_token, "end_token": self.end_token,
                "tokens": self.end_token - self.start_token, "mix": self.mix}


@dataclass(frozen=True)
class StepRule:
    """How a step-driven trainer turns one segment's dataset into optimizer steps.

    Every sample is seq_len + 1 tokens (inputs, and targets shifted by one). `overlapping`: each
    sample starts seq_len tokens after the previous one, sharing its last token (Megatron-Core's
    GPTDataset with add_extra_token_to_sequence, its default); else samples are disjoint windows
    of seq_len + 1 tokens (datatrove's DatatroveFileDataset, which nanotron's Nanoset reads).
    A step takes global_batch samples."""

    trainer: str
    seq_len: int
    global_batch: int
    overlapping: bool

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch

    def samples(self, n_tokens: int) -> int:
        """Samples one epoch of a dataset of `n_tokens` tokens holds."""
        if self.overlapping:
            return max(n_tokens - 1, 0) // self.seq_len
        return n_tokens // (self.seq_len + 1)

    def steps(self, n_tokens: int) -> int:
        """Whole steps one epoch of a dataset of `n_tokens` tokens feeds."""
        return self.samples(n_tokens) // self.global_batch

    def tokens_for(self, steps: int) -> int:
        """The fewest tokens a dataset needs to feed `steps` steps in one epoch."""
        n = steps * self.global_batch
        return n * self.seq_len + 1 if self.overlapping else n * (self.seq_len + 1)


class ExportPlan:
    """One schedule's stream: read any token range, list its stages and segments."""

    def __init__(self, name: str, order_path: Path, store: TokenStore, columns: dict[str, np.ndarray],
                 stages: list[StageRange], stages_yaml: dict[str, Any], segments: list[Segment]):
        self.name = name
        self.order_path = order_path
        self.store = store
        self.offset = columns["offset"]
        self.length = columns["length"]
        self.start = columns["start"]
        self.stage = columns["stage"]
        self.stages = stages
        self.stage_names = [st.name for st in stages]
        self.stages_yaml = stages_yaml
        self.segments = segments
        self._tokens = np.asarray(store.tokens)  # plain ndarray view: np.take on it returns ndarrays
        self._index: np.ndarray | None = None
        # step_segments per step rule: computed once, though a format and its phases both ask;
        # each merge is logged once per trainer, though a format and its phases both ask
        self._step_segments: dict[StepRule, list[Segment]] = {}
        self._logged_merges: set[tuple[str, str]] = set()

    @property
    def n_docs(self) -> int:
        return len(self.offset)

    @property
    def n_tokens(self) -> int:
        return int(self.start[-1] + self.length[-1]) if self.n_docs else 0

    def step_segments(self, rule: StepRule) -> list[Segment]:
        """The segments, each one too short for a step of `rule` merged with its shorter neighbour
        (the shortest first) until every segment feeds a step; only a stream too short for one
        step stays so.

        Steps are whole: a segment too short for one would get none (its documents never trained)
        or wrap into a second epoch of its own documents. A merged segment is named
        "<first part>+<last part>" (a name that stays short enough for a file name however many
        parts it has), numbered as its first, and carries their combined stage mix."""
        if rule not in self._step_segments:
            self._step_segments[rule] = self._merge_short_segments(rule)
        return list(self._step_segments[rule])

    def _merge_short_segments(self, rule: StepRule) -> list[Segment]:
        groups = [[seg] for seg in self.segments]

        def tokens(group: list[Segment]) -> int:
            return group[-1].end_token - group[0].start_token

        while len(groups) > 1:
            short = [i for i, g in enumerate(groups) if rule.steps(tokens(g)) < 1]
            if not short:
                break
            i = min(short, key=lambda i: tokens(groups[i]))
            j = min((k for k in (i - 1, i + 1) if 0 <= k < len(groups)), key=lambda k: tokens(groups[k]))
            lo = min(i, j)
            groups[lo:lo + 2] = [groups[lo] + groups[lo + 1]]
        merged = []
        for group in groups:
            first, last = group[0], group[-1]
            if len(group) == 1:
                merged.append(first)
                continue
            seg = Segment(first.index, f"{first.name}+{last.name}", "merged", first.first_doc, last.end_doc,
                          first.start_token, last.end_token, _stage_mix(self.stage, self.length, self.stage_names,
                                                                        first.first_doc, last.end_doc))
            parts = ", ".join(s.folder for s in group)
            if (rule.trainer, parts) not in self._logged_merges:
                self._logged_merges.add((rule.trainer, parts))
                log.info("export/%s: merged segments %s into %s for trainers (%s needs %d tokens for one step "
                         "of %d samples of %d + 1 tokens; a segment with fewer gets no whole step of its own)",
                         self.name, parts, seg.folder, rule.trainer, rule.tokens_for(1), rule.global_batch,
                         rule.seq_len)
            merged.append(seg)
        return merged

    def phases(self, rule: StepRule) -> list[dict[str, Any]]:
        """`step_segments` with the optimizer steps [start_step, end_step) a step-driven trainer
        spends on each: as many as one epoch of the segment's own dataset feeds (`samples` of them,
        global_batch a step), each phase starting where the previous one ends. Every phase gets at
        least one step once the stream feeds one (the writers refuse a stream that does not)."""
        out, step = [], 0
        for seg in self.step_segments(rule):
            n_tokens = seg.end_token - seg.start_token
            steps = rule.steps(n_tokens)
            out.append({**seg.to_dict(), "samples": rule.samples(n_tokens), "start_step": step, "end_step": step + steps})
            step += steps
        return out

    def stage_steps(self, rule: StepRule) -> list[dict[str, Any]]:
        """Each stage's token range and the steps it maps to under `phases`: a token inside a phase
        maps to the phase's steps in proportion (the trainer shuffles a segment's samples anyway)."""
        phases = self.phases(rule)
        starts = [ph["start_token"] for ph in phases]

        def step_at(token: int) -> int:
            k = bisect.bisect_right(starts, token) - 1
            if k < 0:
                return 0
            ph = phases[k]
            if token >= ph["end_token"]:
                return ph["end_step"]
            steps = ph["end_step"] - ph["start_step"]
            return ph["start_step"] + (token - ph["start_token"]) * steps // (ph["end_token"] - ph["start_token"])

        return [{"name": s.name, "start_token": s.start_token, "end_token": s.end_token,
                 "start_step": step_at(s.start_token), "end_step": step_at(s.end_token)} for s in self.stages]

    def read(self, begin: int, end: int) -> np.ndarray:
        """Tokens [begin, end) of the stream: a slice copy per document where documents are long,
        else one vectorised gather through a per-token source index."""
        if end <= begin:
            return np.zeros(0, self._tokens.dtype)
        first = int(np.searchsorted(self.start, begin, side="right")) - 1
        last = int(np.searchsorted(self.start, end, side="left"))
        starts = np.asarray(self.start[first:last])
        clip_lo = np.maximum(starts, begin)
        counts = np.minimum(starts + np.asarray(self.length[first:last]), end) - clip_lo
        source = np.asarray(self.offset[first:last]) + (clip_lo - starts)
        if (end - begin) >= LOOP_MIN_MEAN_TOKENS * len(counts):
            # long documents: one memcpy-speed slice copy each beats an index per token
            out = np.empty(end - begin, self._tokens.dtype)
            pos = 0
            for src, n in zip(source.tolist(), counts.tolist()):
                out[pos:pos + n] = self._tokens[src:src + n]
                pos += n
            return out
        # Source index of every output token, built as a running sum in a reused buffer (no
        # fresh page faults per chunk): +1 within a document, and at each document's first
        # token a jump from the previous document's last source token to this one's first.
        index = self._index_buffer(end - begin)
        index.fill(1)
        jumps = np.empty_like(source)
        jumps[0] = source[0]
        jumps[1:] = source[1:] - (source[:-1] + counts[:-1] - 1)
        index[np.cumsum(counts) - counts] = jumps
        np.cumsum(index, out=index)
        return np.take(self._tokens, index)

    def _index_buffer(self, n: int) -> np.ndarray:
        if self._index is None or len(self._index) < n:
            self._index = np.empty(n, np.int64)
        return self._index[:n]

    def chunks(self, begin: int, end: int, chunk_tokens: int, desc: str) -> Iterator[np.ndarray]:
        """Tokens [begin, end) in pieces of at most `chunk_tokens`, with a progress bar."""
        with progress_bar(total=end - begin, desc=desc, unit="tok", unit_scale=True, leave=False) as bar:
            for a in range(begin, end, chunk_tokens):
                piece = self.read(a, min(a + chunk_tokens, end))
                yield piece
                bar.update(len(piece))


# -- building -----------------------------------------------------------------------------

def open_plan(run: RunDir, schedule: str, n_substages: int, *, memory_limit: str = "2GB", threads: int = 2,
              batch_docs: int = 1 << 20) -> ExportPlan:
    """Build (or reopen) the plan of `schedule`; a plan built from other inputs is discarded."""
    sched_dir = run.path("schedule", schedule)
    order_path, stages_path = sched_dir / "order.parquet", sched_dir / "stages.yaml"
    if not sched_dir.is_dir():
        made = sorted(p.parent.name for p in run.root.glob("schedule/*/stages.yaml"))
        raise FramelmError(f"there is no schedule '{schedule}' in {run.path('schedule')} (it holds "
                           f"{', '.join(made) or 'none'}); name one of those, or add '{schedule}' to the "
                           f"schedule stage's strategies and run framelm schedule --run-dir {run.root}")
    for p in (order_path, stages_path):
        if not p.is_file():
            raise FramelmError(f"{p} not found; run framelm schedule --run-dir {run.root} (schedule '{schedule}')")
    store = TokenStore.open(run)
    index_path = run.path("tokenize", "index.parquet")
    if not index_path.is_file():
        raise FramelmError(f"{index_path} not found; run framelm tokenize --run-dir {run.root} first")

    export_dir = run.path("export", schedule)
    plan_dir = export_dir / "plan"
    with run.content_hashes() as hashes:
        inputs = {k: _fingerprint(hashes, p) for k, p in {
            "order": order_path, "stages": stages_path, "index": index_path,
            "tokens": run.path("tokenize", "tokens.bin"), "tokenize_meta": run.path("tokenize", "meta.json")}.items()}
    inputs_path = plan_dir / "inputs.json"
    if inputs_path.exists() and fsutil.read_json(inputs_path) != inputs:
        log.info("export/%s: inputs changed since the last export; starting over", schedule)
        shutil.rmtree(export_dir)
    if not inputs_path.exists():
        _build_columns(order_path, index_path, store, plan_dir, memory_limit, threads, batch_docs)
        fsutil.write_json(inputs_path, inputs)
    columns = {name: np.load(plan_dir / f"{name}.npy", mmap_mode="r") for name in PLAN_COLUMNS}

    stages_yaml = _read_stages_yaml(stages_path)
    n_tokens = int(columns["start"][-1] + columns["length"][-1]) if len(columns["start"]) else 0
    stages = _stage_ranges(stages_yaml, stages_path, n_tokens, columns["stage"])
    segments = _segments(columns, [s.name for s in stages], n_substages)
    fsutil.write_json(export_dir / "segments.json", {"schedule": schedule, "n_substages": n_substages,
                                                     "segments": [s.to_dict() for s in segments]})
    return ExportPlan(schedule, order_path, store, columns, stages, stages_yaml, segments)


def _build_columns(order_path: Path, index_path: Path, store: TokenStore, plan_dir: Path,
                   memory_limit: str, threads: int, batch_docs: int) -> None:
    """Join order.parquet with the token index (DuckDB, spilling to disk) into .npy columns."""
    from framelm.sql import connect
    import pyarrow.parquet as pq

    n_docs = pq.ParquetFile(order_path).metadata.num_rows
    plan_dir.mkdir(parents=True, exist_ok=True)
    spill = plan_dir / f"duckdb{fsutil.TMP_TAG}spill"
    con = connect(memory_limit, threads, spill)
    try:
        bounds = con.sql("SELECT min(position), max(position) FROM read_parquet(?)",
                         params=[str(order_path)]).fetchall()[0]
        if n_docs and (bounds[0] != 0 or bounds[1] != n_docs - 1):
            raise FramelmError(f"{order_path}: column 'position' must run from 0 to {n_docs - 1}, "
                               f"found {bounds[0]} .. {bounds[1]}")
        reader = con.sql(
            """SELECT o.position, o.id, o.stage, i."offset" AS "offset", i.n_tokens
               FROM read_parquet(?) o LEFT JOIN read_parquet(?) i ON o.id = i.id
               ORDER BY o.position""", params=[str(order_path), str(index_path)]).to_arrow_reader(batch_docs)
        with _NpyColumnWriters(plan_dir, n_docs) as out:
            row, stream_pos = 0, 0
            for batch in reader:
                position = batch.column("position").to_numpy()
                if row + len(position) > n_docs or not np.array_equal(position, np.arange(row, row + len(position))):
                    raise FramelmError(f"{order_path}: 'position' repeats or skips a value near row {row}, or "
                                       f"tokenize/index.parquet lists an id twice")
                missing = batch.column("n_tokens").is_null()
                if missing.to_numpy(zero_copy_only=False).any():
                    k = int(np.flatnonzero(missing.to_numpy(zero_copy_only=False))[0])
                    raise FramelmError(f"{order_path}: position {row + k}: id {batch.column('id')[k].as_py()!r} "
                                       f"is not in {index_path}; re-run framelm tokenize")
                offset = batch.column("offset").to_numpy().astype(np.int64)
                n_tok = batch.column("n_tokens").to_numpy().astype(np.int64)
                _check_eos(store, offset + n_tok, order_path, row)
                length = n_tok + 1
                start = stream_pos + np.cumsum(length) - length
                out.put(row, offset=offset, length=length, stage=batch.column("stage").to_numpy(), start=start)
                row += len(position)
                stream_pos = int(start[-1] + length[-1]) if len(length) else stream_pos
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)


def _check_eos(store: TokenStore, eos_at: np.ndarray, order_path: Path, row: int) -> None:
    if len(eos_at) and (eos_at.max() >= len(store.tokens) or eos_at.min() < 0):
        raise FramelmError(f"{order_path}: near position {row}: a document's offset + n_tokens lies outside "
                           f"tokenize/tokens.bin ({len(store.tokens)} tokens); the index does not match the store")
    bad = np.flatnonzero(store.tokens[eos_at] != store.eos_id)
    if len(bad):
        raise FramelmError(f"tokenize/tokens.bin: no EOS ({store.eos_id}) after the document at order position "
                           f"{row + int(bad[0])} (token {int(eos_at[bad[0]])}); tokens.bin and index.parquet disagree")


class _NpyColumnWriters:
    """One .npy file per plan column, filled by row ranges and published atomically on exit."""

    def __init__(self, plan_dir: Path, n_rows: int):
        self.plan_dir, self.n_rows = plan_dir, n_rows

    def __enter__(self) -> "_NpyColumnWriters":
        self._stack = contextlib.ExitStack().__enter__()
        self.arrays = {}
        for name, dtype in PLAN_COLUMNS.items():
            tmp = self._stack.enter_context(fsutil.atomic_path(self.plan_dir / f"{name}.npy"))
            self.arrays[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(self.n_rows,))
        return self

    def put(self, row: int, **values: np.ndarray) -> None:
        for name, v in values.items():
            self.arrays[name][row:row + len(v)] = v

    def __exit__(self, *exc: Any) -> bool:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()  # unmap before the files are renamed
        return self._stack.__exit__(*exc)


def _read_stages_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FramelmError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise FramelmError(f"{path}: expected a mapping with a non-empty list under 'stages'")
    return data


def _stage_ranges(data: dict[str, Any], path: Path, n_tokens: int, stage_col: np.ndarray) -> list[StageRange]:
    ranges = []
    for i, st in enumerate(data["stages"]):
        for key in ("name", "start_token", "end_token"):
            if not isinstance(st, dict) or key not in st:
                raise FramelmError(f"{path}: stages[{i}] has no '{key}'")
        ranges.append(StageRange(str(st["name"]), int(st["start_token"]), int(st["end_token"])))
    # n_tokens counts order.parquet's documents, each with its EOS
    check_stages(ranges, n_tokens, str(path))
    if len(stage_col) and (int(stage_col.min()) < 0 or int(stage_col.max()) >= len(ranges)):
        raise FramelmError(f"{path}: order.parquet's 'stage' runs from {int(stage_col.min())} to "
                           f"{int(stage_col.max())} but stages.yaml lists {len(ranges)} stages")
    return ranges


def _segments(columns: dict[str, np.ndarray], names: list[str], n_substages: int) -> list[Segment]:
    stage = np.asarray(columns["stage"])
    start = np.asarray(columns["start"])
    length = np.asarray(columns["length"])
    n = len(stage)
    if n == 0:
        return []
    ends = np.append(start, start[-1] + length[-1])  # token start of doc i, and the stream end
    running_max = np.maximum.accumulate(stage)
    running_min_from_end = np.minimum.accumulate(stage[::-1])[::-1]
    windows: list[list[int]] = []  # [first_doc, end_doc) of each transition window
    for s in range(len(names) - 1):
        first_later = int(np.searchsorted(running_max, s, side="right"))
        end_earlier = int(np.searchsorted(running_min_from_end, s, side="right"))
        if first_later < end_earlier:
            if windows and first_later <= windows[-1][1]:
                windows[-1][1] = max(windows[-1][1], end_earlier)
            else:
                windows.append([first_later, end_earlier])

    segments: list[Segment] = []

    def add(kind: str, name: str, a: int, b: int) -> None:
        if b > a:
            segments.append(Segment(len(segments), name, kind, a, b, int(ends[a]), int(ends[b]),
                                    _stage_mix(stage, length, names, a, b)))

    def add_stages(a: int, b: int) -> None:
        """A stretch outside transition windows: one segment per stage (hard switches inside)."""
        cuts = [a, *(np.flatnonzero(np.diff(stage[a:b])) + 1 + a), b]
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            add("stage", names[int(stage[c0])], int(c0), int(c1))

    cursor = 0
    for a, b in windows:
        add_stages(cursor, a)
        lo, hi = names[int(stage[a:b].min())], names[int(stage[a:b].max())]
        targets = ends[a] + (ends[b] - ends[a]) * np.arange(n_substages + 1) / n_substages
        cuts = np.unique(np.clip(np.searchsorted(ends, targets, side="left"), a, b))
        cuts[0], cuts[-1] = a, b
        for k, (c0, c1) in enumerate(zip(cuts[:-1], cuts[1:])):
            add("transition", f"{lo}_to_{hi}_{k + 1}of{len(cuts) - 1}", int(c0), int(c1))
        cursor = b
    add_stages(cursor, n)
    return segments


def _stage_mix(stage: np.ndarray, length: np.ndarray, names: list[str], a: int, b: int) -> dict[str, float]:
    """Token share of each stage among documents [a, b)."""
    tok = np.bincount(stage[a:b], weights=length[a:b], minlength=len(names))
    return {names[i]: round(float(tok[i] / tok.sum()), 6) for i in range(len(names)) if tok[i] > 0}


# -- small helpers shared by the format writers ---------------------------------------------

def write_binary(path: Path, parts: Iterable[bytes | np.ndarray]) -> bool:
    """Write `parts` to `path` atomically and mark it done; False (nothing written) if already done."""
    if fsutil.is_done(path):
        return False
    with fsutil.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for part in parts:
            fh.write(part if isinstance(part, bytes) else np.ascontiguousarray(part).data)
    fsutil.mark_done(path)
    return True


def _fingerprint(hashes: fsutil.ContentHashes, path: Path) -> dict[str, Any]:
    fp = hashes.fingerprint(path)
    fp.pop("path")
    return fp
