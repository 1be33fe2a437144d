"""Order the partitioned training documents into curricula: one schedule per strategy.

Reads  RUN/score/scores.parquet with its labels RUN/partition/quadrants.parquet (labelled
       split == "train" rows only) and RUN/partition/summary.json (the grid of cells); a `yaml`
       strategy also reads the user's schedule file.
Writes RUN/schedule/<strategy>/order.parquet   position: int64, id, stage: int32, source,
                                               quadrant, n_tokens, epoch: int32
       RUN/schedule/<strategy>/stages.yaml     per stage: name, start/end token, start/end
                                               optimizer step, docs, tokens, composition
                                               (token share per cell and per source); per
                                               source: tokens available, scheduled, epochs.

A document contributes n_tokens + 1 (its EOS) to the stream. Every strategy draws its
documents from *pools* (a cell or a source) through a `PoolStream`: a seeded permutation of
the pool per epoch, consumed in order, so a budget below the pool's tokens subsamples it and a
budget above repeats it (the `epoch` column counts repeats). Strategies that draw the same
budgets from the same pools with the same seed (frame, random, permutation, the two-stage
splits, sorted) therefore schedule exactly the same multiset of documents and differ only in
order. Between consecutive stages the next stage's share rises along a transition curve over a
window centred on the boundary; the nominal boundary (the token where the unmixed stream
would switch) is what stages.yaml records, so stage token ranges are contiguous and each
stage's range length equals its documents' tokens. Step ranges are half-open,
[start_step, end_step), with start_step = start_token // tokens_per_step and end_step =
ceil(end_token / tokens_per_step): a step that straddles a boundary belongs to both stages.
Trainers take whole steps only, so total_steps = total_tokens // tokens_per_step, no end_step
passes it, and the `tail_tokens` after the last whole step are not trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from framelm import fsutil
from framelm.columnar import Categories, code_counts, code_totals, in_background, index_dtype, row_groups
from framelm.config import StageConfig, field, load_yaml
from framelm.errors import ConfigError, FramelmError
from framelm.partition import SCORES, read_labels
from framelm.rundir import RunDir

log = logging.getLogger("framelm")

SUMMARY = "partition/summary.json"
WRITE_CHUNK_ROWS = 1 << 21
BUDGET_MISS = 0.05  # a schedule further than this from total_tokens is warned about
FEW_BLEND_DOCS = 4  # a transition window with fewer documents than this on a side is warned about


@dataclass
class StrategyConfig(StageConfig):
    kind: Literal["frame", "random", "permutation", "ppl_two_stage", "pd_two_stage", "sorted", "two_phase", "yaml"] = field(
        "frame", help="frame: Q3->Q4->Q1->Q2; random: same documents shuffled; permutation: cells in `order`; "
                      "ppl_two_stage: high then low PPL; pd_two_stage: low then high PD; sorted: by `column`; "
                      "two_phase: per-source blends per phase; yaml: a schedule file (`path`)")
    name: str = field("", help="output folder RUN/schedule/<name>; default: the kind")
    order: list[str] = field(default_factory=list, help="permutation: every cell name once, in stage order, e.g. [Q2, Q1, Q4, Q3]")
    column: str = field("ppl", help="sorted: the numeric column of score/scores.parquet to sort by "
                                    "(ppl, pd, n_tokens, ppl_weak, bpb_strong, ...)")
    descending: bool = field(False, help="sorted: largest value first")
    n_stages: int = field(1, help="sorted: cut the sorted stream into this many equal-token stages")
    phase_split: list[float] = field(default_factory=lambda: [0.6, 0.4], help="two_phase: token share of each phase (sums to 1)")
    blends: list[dict[str, float]] = field(
        default_factory=list, help="two_phase: one blend per phase, {source or tier: token weight} summing to 1; "
                                   "a tier's weight is split over its sources by their tokens")
    tiers: dict[str, str] = field(default_factory=dict, help="two_phase: quality tier of each source, e.g. {math: high, forum: low}")
    design_tokens: int | None = field(
        None, help="two_phase: the horizon (tokens) the blends were designed for; each source is downsampled "
                   "to total/design of its tokens so that its epoch count is the designed one")
    path: str = field("", help="yaml: the schedule file")
    epoch_caps: dict[str, float] = field(default_factory=dict, help="most epochs allowed per source (overrides max_epochs)")

    @property
    def label(self) -> str:
        return self.name or self.kind

    def validate(self) -> None:
        if self.name and (not self.name.replace("_", "").replace("-", "").isalnum()):
            raise ConfigError(f"'name' = {self.name!r}: use letters, digits, '-' and '_' only (it names a folder)")
        if self.kind == "permutation" and not self.order:
            raise ConfigError("a permutation strategy needs 'order', e.g. order: [Q2, Q1, Q4, Q3]")
        if self.kind == "sorted":
            if self.n_stages < 1:
                raise ConfigError(f"'n_stages' must be >= 1, got {self.n_stages}")
        if self.kind == "two_phase":
            if not self.phase_split or any(s <= 0 for s in self.phase_split) or abs(sum(self.phase_split) - 1) > 1e-6:
                raise ConfigError(f"'phase_split' = {self.phase_split}: positive shares summing to 1, e.g. [0.6, 0.4]")
            if len(self.blends) != len(self.phase_split):
                raise ConfigError(f"'blends' has {len(self.blends)} blend(s) for {len(self.phase_split)} phases; give one "
                                  f"{{source: weight}} mapping per phase, e.g. [{{web: 0.8, math: 0.2}}, {{web: 0.5, math: 0.5}}]")
            for p, blend in enumerate(self.blends):
                check_weights(blend, f"blends[{p}]")
            if self.design_tokens is not None and self.design_tokens <= 0:
                raise ConfigError(f"'design_tokens' must be positive, got {self.design_tokens}")
        if self.kind == "yaml" and not self.path:
            raise ConfigError("a yaml strategy needs 'path', the schedule file")
        for source, cap in self.epoch_caps.items():
            if cap <= 0:
                raise ConfigError(f"'epoch_caps.{source}' must be positive, got {cap}")


def _default_strategies() -> list[StrategyConfig]:
    return [StrategyConfig(kind="frame"), StrategyConfig(kind="random")]


@dataclass
class ScheduleConfig(StageConfig):
    strategies: list[StrategyConfig] = field(default_factory=_default_strategies, help="the schedules to build (set with --set or a config file)")
    total_tokens: int | None = field(None, help="tokens in each schedule (EOS included); default: one pass over the training documents")
    seq_len: int = field(1024, help="training sequence length in tokens (for the optimizer-step ranges)")
    global_batch: int = field(32, help="sequences per optimizer step; tokens per step = global_batch * seq_len")
    seed: int = field(0, help="seed of every sampling and shuffling decision")
    transition: Literal["hard", "linear", "logistic"] = field("logistic", help="how the next stage's share rises at a boundary")
    transition_window: float = field(0.1, help="window of a transition, as a fraction of the smaller neighbouring stage's tokens")
    logistic_steepness: float = field(10.0, help="slope of the logistic S-curve over the window (larger: closer to hard)")
    max_epochs: float | None = field(None, help="most epochs any source may be repeated (None: no cap)")
    weight_tolerance: float = field(1e-3, help="how far the mixture weights and stage shares of a yaml schedule may sum from 1")
    threads: int = field(2, help="threads that permute pools and gather ids while order.parquet is written", hash=False)

    def validate(self) -> None:
        if not self.strategies:
            raise ConfigError("'strategies' is empty; give at least one, e.g. [{kind: frame}, {kind: random}]")
        labels = [s.label for s in self.strategies]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ConfigError(f"'strategies': two schedules are named {dupes[0]!r}; give each a distinct 'name'")
        if self.total_tokens is not None and self.total_tokens <= 0:
            raise ConfigError(f"'total_tokens' must be positive, got {self.total_tokens}")
        for key in ("seq_len", "global_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.transition_window <= 1:
            raise ConfigError(f"'transition_window' must be in [0, 1], got {self.transition_window}")
        if self.logistic_steepness <= 0:
            raise ConfigError(f"'logistic_steepness' must be positive, got {self.logistic_steepness}")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ConfigError(f"'max_epochs' must be positive, got {self.max_epochs}")
        if self.threads < 1:
            raise ConfigError(f"'threads' must be >= 1, got {self.threads}")

    def hashed_dict(self) -> dict[str, Any]:
        # A yaml strategy's result depends on its file's content, not only on its path.
        data = super().hashed_dict()
        for entry, strategy in zip(data["strategies"], self.strategies):
            if strategy.kind == "yaml" and Path(strategy.path).is_file():
                entry["path_sha256"] = fsutil.sha256_file(strategy.path)
        return data


def check_weights(weights: dict[str, float], where: str, tolerance: float = 1e-3) -> None:
    if not weights:
        raise ConfigError(f"{where}: empty mixture; give {{name: weight}} pairs summing to 1")
    bad = {k: w for k, w in weights.items() if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0}
    if bad:
        k = next(iter(bad))
        raise ConfigError(f"{where}.{k}: weight {bad[k]!r} must be a finite number >= 0")
    total = float(sum(weights.values()))
    if abs(total - 1) > tolerance:
        raise ConfigError(f"{where}: weights sum to {total:.6g}, not 1 (tolerance {tolerance:g}): {weights}")


# -- the training documents ---------------------------------------------------------------


@dataclass
class Corpus:
    """The training documents, as arrays indexed by document.

    The arrays are as narrow as their values allow (weight int32 unless a document has over
    2**31 tokens, cell and source int16 below 32768 values): the planner and the writer gather
    them at random, and at 100 M documents half the bytes is nearly half the time."""

    weight: np.ndarray  # tokens each document puts into the stream: n_tokens + its EOS
    cell: np.ndarray  # index into cell_names
    source: np.ndarray  # index into source_names
    cell_names: list[str]
    cell_bins: list[tuple[int, int]]  # (ppl_bin, pd_bin) of each cell
    source_names: list[str]
    rows: np.ndarray  # row of each document in `path` (or the table it was read from)
    ids: Any = None  # one Arrow string array of every row's id (document i's at rows[i]); or a Future of it
    path: Path | None = None  # scores.parquet, whose columns `sorted` reads

    def doc_ids(self, docs: np.ndarray | None = None) -> Any:
        """The ids of documents `docs` (default: all), in that order."""
        if isinstance(self.ids, Future):
            self.ids = self.ids.result()  # read in the background while the schedule was planned
        return self.ids.take(pa.array(self.rows if docs is None else self.rows[docs]))

    @cached_property
    def pair(self) -> np.ndarray:
        """One code per document for its (cell, source): cell * n_sources + source. The writer
        gathers this one array at random instead of two."""
        pair = self.cell.astype(_code_dtype(len(self.cell_names) * len(self.source_names)))
        pair *= len(self.source_names)
        pair += self.source
        return pair

    def column(self, name: str) -> np.ndarray:
        """A numeric column of scores.parquet for every document."""
        import pyarrow.parquet as pq

        if name == "n_tokens":
            return (self.weight - 1).astype(float)
        if self.path is None:
            raise FramelmError(f"column {name!r} is not loaded")
        numeric = sorted(f.name for f in pq.read_schema(self.path) if pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        if name not in numeric:
            raise ConfigError(f"'column' = {name!r} is not a numeric column of {self.path}; choose one of {', '.join(numeric)}")
        values = pq.read_table(self.path, columns=[name]).column(name).to_numpy(zero_copy_only=False).astype(float)[self.rows]
        if not np.isfinite(values).all():
            raise FramelmError(f"{self.path}: column {name!r} is missing, NaN or infinite for some scheduled documents; sort by another column")
        return values

    @classmethod
    def from_table(cls, table: Any, cells: list[dict[str, Any]]) -> "Corpus":
        """From an in-memory table (columns id, source, quadrant, n_tokens; optional split) and
        the partition's cell list. Rows without a quadrant are not documents."""
        names = Categories(c["name"] for c in cells)
        codes = names.codes(table.column("quadrant")).astype(np.int16)
        if len(names.values) > len(cells):
            raise FramelmError(f"cell {names.values[len(cells)]!r} is not in the partition's cells {names.values[:len(cells)]}")
        corpus = cls.read([(table, codes)], table.num_rows, cells)
        corpus.ids = _one_chunk(table.column("id"))
        return corpus

    @classmethod
    def read(cls, pieces: Iterable[tuple[Any, np.ndarray]], n_rows: int, cells: list[dict[str, Any]],
             path: Path | None = None) -> "Corpus":
        """From (table, cell codes) pieces of n_rows rows in all: tables with columns source,
        n_tokens and optionally split, codes indexing `cells` (-1: no label). The documents
        are the rows with a label and split == "train"."""
        where = path or "the table"
        cell_names = [c["name"] for c in cells]
        sources, splits = Categories(), Categories()
        weight = np.empty(n_rows, np.int32)  # widened if a document has 2**31 tokens or more
        cell, source = np.empty(n_rows, _code_dtype(len(cells))), np.empty(n_rows, np.int16)
        rows = np.empty(n_rows, index_dtype(n_rows))
        at = row = 0
        for table, codes in pieces:
            m = table.num_rows
            labelled = codes >= 0
            if "split" in table.column_names:
                labelled &= splits.codes(table.column("split")) == splits.code_of("train")
            keep = slice(None) if labelled.all() else np.flatnonzero(labelled)
            k = m if isinstance(keep, slice) else len(keep)
            part = slice(at, at + k)
            if isinstance(keep, slice):
                rows[part] = np.arange(row, row + m)
            else:
                np.add(keep, row, out=rows[part], casting="unsafe")  # row + m < n_rows fits rows' type
            cell[part] = codes[keep]
            source_codes = sources.codes(table.column("source"))[keep]
            if k and source_codes.min() < 0:
                raise FramelmError(f"{where}: a labelled document has no source")
            if len(sources.values) > np.iinfo(source.dtype).max:
                source = source.astype(np.int32)
            source[part] = source_codes
            n_tokens = table.column("n_tokens")
            if n_tokens.null_count:
                raise FramelmError(f"{where}: n_tokens is missing in some rows; re-run framelm score")
            n_tokens = n_tokens.to_numpy()[keep]
            if k and n_tokens.min() < 0:
                raise FramelmError(f"{where}: negative n_tokens in row {row + int(np.flatnonzero(n_tokens < 0)[0])}")
            if k and n_tokens.max() >= np.iinfo(weight.dtype).max:
                weight = weight.astype(np.int64)
            np.add(n_tokens, 1, out=weight[part], casting="unsafe")  # checked to fit just above
            at += k
            row += m
        source_names = sorted(sources.values)
        source, order = source[:at], np.array([source_names.index(v) for v in sources.values] or [0], source.dtype)
        for lo in range(0, at, 1 << 22):  # renumbered in place, by name, a slice at a time
            source[lo:lo + (1 << 22)] = order[source[lo:lo + (1 << 22)]]
        return cls(weight=weight[:at], cell=cell[:at], source=source, cell_names=cell_names,
                   cell_bins=[(int(c["ppl_bin"]), int(c["pd_bin"])) for c in cells], source_names=source_names,
                   rows=rows[:at], path=path)


def _code_dtype(n_values: int) -> type:
    return np.int16 if n_values <= np.iinfo(np.int16).max else np.int32


def _read_ids(path: Path) -> Any:
    """Every id of a Parquet file as one contiguous string array. Each row group is copied in
    as it is read and then freed, so the column is in memory once; Arrow's take on a chunked
    array would concatenate every chunk on each call (1.6 GB per call at 100 M ids)."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    n, column = parquet.metadata.num_rows, parquet.schema_arrow.get_field_index("id")
    # Plain-encoded strings take 4 bytes more each than their characters: a bound on the bytes
    # (pages never written to are never touched). A shortfall (repeated ids) grows the buffer.
    bound = sum(parquet.metadata.row_group(g).column(column).total_uncompressed_size for g in range(parquet.num_row_groups))
    offsets = np.zeros(n + 1, np.int64 if bound >= 1 << 31 else np.int32)
    data = np.empty(bound, np.uint8)
    row = byte = 0
    for table in row_groups(parquet, ["id"]):
        for chunk in table.column("id").chunks:
            if chunk.null_count:
                raise FramelmError(f"{path}: {chunk.null_count} document(s) among rows {row}-{row + len(chunk) - 1} have no id")
            if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
                chunk = chunk.cast(pa.string())
            o = np.frombuffer(chunk.buffers()[1], np.int64 if pa.types.is_large_string(chunk.type) else np.int32, len(chunk) + 1, chunk.offset)
            d = np.frombuffer(chunk.buffers()[2], np.uint8) if chunk.buffers()[2] is not None else np.empty(0, np.uint8)
            end = byte + int(o[-1] - o[0])
            if end > len(data):
                grown = np.empty(max(2 * len(data), end), np.uint8)
                grown[:byte] = data[:byte]
                data = grown
            if end >= 1 << 31 and offsets.dtype == np.int32:
                offsets = offsets.astype(np.int64)
            data[byte:end] = d[o[0]:o[-1]]
            offsets[row + 1:row + len(chunk) + 1] = o[1:].astype(offsets.dtype) - (int(o[0]) - byte)
            row, byte = row + len(chunk), end
    kind = pa.large_string() if offsets.dtype == np.int64 else pa.string()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(data[:byte])])


def _one_chunk(ids: Any) -> Any:
    if ids.nbytes >= 1 << 31:  # one string array holds at most 2 GiB of characters
        ids = ids.cast(pa.large_string())
    return ids.combine_chunks()


def load_corpus(run: RunDir) -> Corpus:
    """The labelled split == "train" rows of scores.parquet; the ids are read in the background."""
    import pyarrow.parquet as pq

    summary_path = run.path(SUMMARY)
    if not summary_path.is_file():
        raise FramelmError(f"{summary_path} not found; run the partition stage first: framelm partition --run-dir {run.root}")
    summary = fsutil.read_json(summary_path, f"re-run: framelm partition --run-dir {run.root} --force")
    path = run.path(SCORES)
    codes, cells = read_labels(run)  # first: it refuses scores that changed after the partition
    if [c[0] for c in cells] != [c["name"] for c in summary["cells"]]:
        raise FramelmError(f"{summary_path} and the labels in {run.path('partition')} name different cells; "
                           f"re-run: framelm partition --run-dir {run.root} --force")
    ids = in_background(lambda: _read_ids(path))

    def pieces() -> Iterable[tuple[Any, np.ndarray]]:
        at = 0
        for table in row_groups(pq.ParquetFile(path, read_dictionary=["source", "split"]), ["source", "n_tokens", "split"]):
            yield table, codes[at:at + table.num_rows]
            at += table.num_rows

    corpus = Corpus.read(pieces(), len(codes), summary["cells"], path=path)
    corpus.ids = ids
    if not len(corpus.weight):
        raise FramelmError(f"{path}: no labelled document has split 'train'; nothing to schedule")
    return corpus


# -- pools --------------------------------------------------------------------------------


def _key_seed(key: str) -> int:
    return zlib.crc32(key.encode())


class PoolStream:
    """An endless, seeded stream over one pool of documents: epoch e is a permutation of the
    pool seeded by (seed, pool key, e). `take(budget)` continues where the last call ended and
    stops at the document boundary nearest to the running target, so rounding never drifts."""

    def __init__(self, key: str, members: np.ndarray, weight: np.ndarray, seed: int):
        self.key, self.members, self.seed = key, members, seed
        self.member_weight = weight[members]  # members ascend: a streaming gather, done once
        self.tokens = int(self.member_weight.sum())
        self.target = 0.0  # tokens asked for so far
        self.position = 0  # documents handed out so far, over all epochs
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._cum: np.ndarray | None = None

    def permute(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(documents, their weights) of an epoch, in stream order."""
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = self._cum = None  # free the previous epoch's arrays first
            rng = np.random.default_rng([self.seed, _key_seed(self.key), epoch])
            self._epoch = (epoch, *shuffled(rng, self.members, self.member_weight))
        return self._epoch[1], self._epoch[2]

    def _cumulative(self, epoch: int) -> np.ndarray:
        """Tokens before each document of an epoch (from 0), computed only when a budget ends
        inside the epoch: a whole pass does not need it."""
        _, w = self.permute(epoch)
        if self._cum is None:
            self._cum = np.zeros(len(w) + 1, np.int64)
            np.cumsum(w, out=self._cum[1:])
        return self._cum

    def take(self, budget: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Documents (row indices), their epoch numbers and weights, worth about `budget` tokens."""
        n = len(self.members)
        if budget <= 0:
            return _empty_draw()
        if n == 0:
            raise FramelmError(f"pool {self.key!r} has no documents to draw {budget:.0f} tokens from")
        if self.tokens == 0:
            raise FramelmError(f"pool {self.key!r} has no tokens to draw {budget:.0f} from")
        self.target += budget
        full, rest = divmod(self.target, self.tokens)
        k = 0
        if rest > 0:  # an exact multiple of the pool ends at an epoch boundary: no need to permute the next epoch
            cum = self._cumulative(int(full))
            k = int(np.searchsorted(cum, rest))
            if k > 0 and rest - cum[k - 1] < cum[k] - rest:
                k -= 1
        end = int(full) * n + k
        parts = []
        while self.position < end:
            epoch, offset = divmod(self.position, n)
            stop = min(end - epoch * n, n)
            order, w = self.permute(epoch)
            # the epoch column as a broadcast view: a pass over 100 M documents would otherwise
            # fill 400 MB with one number
            parts.append((order[offset:stop], np.broadcast_to(np.int32(epoch), (stop - offset,)), w[offset:stop]))
            self.position = epoch * n + stop
        return _concat(parts)


def permute_first_epochs(streams: list[PoolStream], threads: int) -> None:
    """Permute every pool's first epoch, `threads` pools at a time: the shuffles and gathers are
    random memory accesses that release the GIL, the slowest part of planning a big corpus."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(lambda s: s.permute(0), [s for s in streams if len(s.members)]))


# -- plans --------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    idx: np.ndarray  # row indices into the corpus, in stream order
    epoch: np.ndarray
    weight: np.ndarray  # each document's tokens (corpus.weight[idx]), carried so nothing gathers them again


@dataclass
class Schedule:
    name: str
    kind: str
    stages: list[Stage]
    smooth: bool  # whether transitions apply between these stages
    pool_tokens: dict[str, int]  # per source: unique tokens the schedule draws from


Draw = tuple[np.ndarray, np.ndarray, np.ndarray]  # (idx, epoch, weight)


def _empty_draw() -> Draw:
    return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int64)


def _concat(parts: list[Draw]) -> Draw:
    if not parts:
        return _empty_draw()
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _shuffle(seed: int, key: str, idx: np.ndarray, epoch: np.ndarray, weight: np.ndarray) -> Stage:
    rng = np.random.default_rng([seed, _key_seed(key)])
    if epoch.strides == (0,):  # one epoch number for all, as a broadcast view: nothing to move
        idx, weight = shuffled(rng, idx, weight)
        return Stage(key, idx, epoch, weight)
    return Stage(key, *shuffled(rng, idx, epoch, weight))


SHUFFLE_BUCKET_ROWS = 1 << 18  # two int32 arrays of a bucket fill 2 MB, about a core's L2 cache


def shuffled(rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
    """The arrays (of one length) under one uniformly random permutation drawn from `rng`.

    Rao-Sandelius: every row draws a random bucket, rows go to their buckets in a stable
    (radix) sort, and each bucket, small enough for the cache, is permuted on its own. The
    moves are runs of nearby reads and writes, where a permutation gathered at random misses
    the cache on every row: 1.6 s instead of 2.6 s for two arrays of 24 M rows."""
    n = len(arrays[0])
    n_buckets = min(1 << 15, max(1, n // SHUFFLE_BUCKET_ROWS))
    if n_buckets == 1:
        perm = rng.permutation(n)
        return [a[perm] for a in arrays]
    bucket = rng.integers(0, n_buckets, n, dtype=np.int16)
    by_bucket = np.argsort(bucket, kind="stable")
    out = [a[by_bucket] for a in arrays]
    del by_bucket
    ends = np.cumsum(code_counts(bucket, n_buckets))
    del bucket
    lo = 0
    for hi in ends.tolist():
        perm = rng.permutation(hi - lo)
        for a in out:
            a[lo:hi] = a[lo:hi][perm]
        lo = hi
    return out


MEMBER_SLICE_ROWS = 1 << 22


class Builder:
    """Builds one schedule in memory from a corpus and the stage config."""

    def __init__(self, corpus: Corpus, cfg: ScheduleConfig):
        self.corpus, self.cfg = corpus, cfg
        self.weight = corpus.weight
        self.data_tokens = int(self.weight.sum())
        self.total = float(cfg.total_tokens if cfg.total_tokens is not None else self.data_tokens)
        # documents and tokens per (cell, source), in one pass over the corpus
        docs, tokens = code_totals(corpus.pair, self.weight, len(corpus.cell_names) * len(corpus.source_names))
        self.pair_docs = docs.reshape(len(corpus.cell_names), len(corpus.source_names))
        tokens = tokens.reshape(self.pair_docs.shape)
        self.source_tokens, self.cell_tokens = tokens.sum(axis=0), tokens.sum(axis=1)

    # pools
    @staticmethod
    def _members(codes: np.ndarray, n_codes: int) -> list[np.ndarray]:
        """Row indices holding each code 0..n_codes-1, ascending."""
        dtype = index_dtype(len(codes))
        if n_codes <= 16:
            # A pass per code beats a sort while the codes are few. Counted first and filled a
            # slice at a time, so that no index array exists twice or in 64 bits.
            members, filled = [np.empty(int(c), dtype) for c in code_counts(codes, n_codes)], [0] * n_codes
            for sl in (slice(lo, lo + MEMBER_SLICE_ROWS) for lo in range(0, len(codes), MEMBER_SLICE_ROWS)):
                part = codes[sl]
                for c in range(n_codes):
                    idx = np.flatnonzero(part == c)
                    np.add(idx, sl.start, out=members[c][filled[c]:filled[c] + len(idx)], casting="unsafe")
                    filled[c] += len(idx)
            return members
        if n_codes < np.iinfo(np.int16).max:
            codes = codes.astype(np.int16)  # numpy's stable sort is a linear-time radix sort at 16 bits
        order = np.argsort(codes, kind="stable").astype(dtype)
        bounds = np.searchsorted(codes[order], np.arange(n_codes + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(n_codes)]

    def cell_streams(self) -> dict[str, PoolStream]:
        members = self._members(self.corpus.cell, len(self.corpus.cell_names))
        streams = {name: PoolStream(f"cell:{name}", members[i], self.weight, self.cfg.seed) for i, name in enumerate(self.corpus.cell_names)}
        permute_first_epochs(list(streams.values()), self.cfg.threads)
        return streams

    def source_streams(self, fraction: float = 1.0) -> dict[str, PoolStream]:
        """One stream per source; fraction < 1 first downsamples each source (seeded) to that share of
        its tokens, to one document at least."""
        members = self._members(self.corpus.source, len(self.corpus.source_names))
        streams = {}
        for i, name in enumerate(self.corpus.source_names):
            pool = members[i]
            if fraction < 1:
                sample = PoolStream(f"subsample:{name}", pool, self.weight, self.cfg.seed)
                pool = sample.take(fraction * self.source_tokens[i])[0]
                if not len(pool):
                    # The target is under half the first sampled document: keep that document, which
                    # the budget then repeats (fewer epochs than designed), rather than lose the source.
                    pool = sample.permute(0)[0][:1]
                pool = np.sort(pool)
            streams[name] = PoolStream(f"source:{name}", pool, self.weight, self.cfg.seed)
        permute_first_epochs(list(streams.values()), self.cfg.threads)
        return streams

    def _check_caps(self, strategy: StrategyConfig, needed: dict[str, tuple[float, str]]) -> None:
        """needed: source -> (epochs its budget needs, what drives it). Raise if a cap is exceeded."""
        unknown = [s for s in strategy.epoch_caps if s not in self.corpus.source_names]
        if unknown:
            where = f"strategy {strategy.label!r}" + (f" (or its file {strategy.path})" if strategy.kind == "yaml" else "")
            raise ConfigError(f"{where}: 'epoch_caps.{unknown[0]}' names no source; sources: {', '.join(self.corpus.source_names)}")
        for source, (epochs, why) in sorted(needed.items()):
            cap = strategy.epoch_caps.get(source, self.cfg.max_epochs)
            if cap is not None and epochs > cap * (1 + 1e-9):
                raise FramelmError(
                    f"strategy {strategy.label!r}: source {source!r} needs {epochs:.3g} epochs{why} but at most {cap:g} are allowed; "
                    f"lower total_tokens, lower its weight, or raise epoch_caps.{source} / max_epochs")

    # cell-based strategies: each cell gets budget proportional to its tokens
    def _cell_draws(self, strategy: StrategyConfig) -> dict[str, Draw]:
        scale = self.total / self.data_tokens  # every cell, hence every source, repeats `scale` times
        present = np.flatnonzero(self.pair_docs.sum(axis=0))
        self._check_caps(strategy, {self.corpus.source_names[s]: (scale, "") for s in present})
        streams = self.cell_streams()
        return {name: streams[name].take(self.cell_tokens[i] * scale) for i, name in enumerate(self.corpus.cell_names)}

    def _nonempty_cells(self) -> list[str]:
        return [n for i, n in enumerate(self.corpus.cell_names) if self.cell_tokens[i] > 0]

    def frame_order(self) -> list[str]:
        """High PPL before low, and inside each PPL bin low PD before high: Q3, Q4, Q1, Q2."""
        cells = sorted(zip(self.corpus.cell_bins, self.corpus.cell_names), key=lambda c: (-c[0][0], c[0][1]))
        return [name for _, name in cells if name in self._nonempty_cells()]

    def _cells_in_order(self, strategy: StrategyConfig, order: list[str]) -> list[Stage]:
        draws = self._cell_draws(strategy)
        return [Stage(name, *draws[name]) for name in order]

    def build(self, strategy: StrategyConfig) -> Schedule:
        kind = strategy.kind
        smooth = True
        pool_tokens = {s: int(t) for s, t in zip(self.corpus.source_names, self.source_tokens)}
        if kind == "frame":
            stages = self._cells_in_order(strategy, self.frame_order())
        elif kind == "permutation":
            stages = self._cells_in_order(strategy, self._check_order(strategy))
        elif kind == "random":
            draws = self._cell_draws(strategy)
            stages = [_shuffle(self.cfg.seed, "random", *_concat([draws[n] for n in self.corpus.cell_names]))]
        elif kind in ("ppl_two_stage", "pd_two_stage"):
            stages = self._two_stage(strategy)
        elif kind == "sorted":
            stages, smooth = self._sorted(strategy), False
        elif kind == "two_phase":
            stages, pool_tokens = self._two_phase(strategy)
        else:
            stages, pool_tokens = self._yaml(strategy)
        if not any(len(st.idx) for st in stages):
            # Every pool's budget rounded down to no document: the schedule would train on nothing.
            budgets = f"the stage budgets of {strategy.path}" if kind == "yaml" else f"total_tokens = {self.total:,.0f}"
            raise ConfigError(f"strategy {strategy.label!r}: no document fits {budgets}: each pool's share rounds "
                              f"to the nearest document boundary, and the shortest document holds "
                              f"{int(self.weight.min())} tokens with its EOS; raise {'them' if kind == 'yaml' else 'total_tokens'}")
        return Schedule(strategy.label, kind, stages, smooth, pool_tokens)

    def _check_order(self, strategy: StrategyConfig) -> list[str]:
        cells = self._nonempty_cells()
        unknown = [c for c in strategy.order if c not in self.corpus.cell_names]
        if unknown:
            raise ConfigError(f"strategy {strategy.label!r}: 'order' names unknown cell {unknown[0]!r}; cells: {', '.join(self.corpus.cell_names)}")
        missing = [c for c in cells if c not in strategy.order]
        dupes = sorted({c for c in strategy.order if strategy.order.count(c) > 1})
        if missing or dupes:
            raise ConfigError(f"strategy {strategy.label!r}: 'order' must name every non-empty cell once "
                              f"({', '.join(cells)}); missing: {missing or 'none'}, repeated: {dupes or 'none'}")
        return [c for c in strategy.order if c in cells]

    def _two_stage(self, strategy: StrategyConfig) -> list[Stage]:
        """Split on one axis at its middle, PPL high then low or PD low then high: bins below
        n_bins // 2 are low, the rest high (of an odd number of bins, the middle one is high)."""
        axis = 0 if strategy.kind == "ppl_two_stage" else 1
        n_bins = max(b[axis] for b in self.corpus.cell_bins) + 1
        draws = self._cell_draws(strategy)
        high = [draws[n] for n, b in zip(self.corpus.cell_names, self.corpus.cell_bins) if b[axis] >= n_bins // 2]
        low = [draws[n] for n, b in zip(self.corpus.cell_names, self.corpus.cell_bins) if b[axis] < n_bins // 2]
        if n_bins % 2:
            share = sum(int(w.sum()) for *_, w in high) / max(1, sum(int(w.sum()) for *_, w in high + low))
            log.warning("schedule %r: the partition has %d %s bins, an odd number, so the middle bin goes to the high "
                        "stage, which gets %.0f%% of the tokens; for an even split use an even number of bins or "
                        "{kind: sorted, column: %s, n_stages: 2}", strategy.label, n_bins, ("PPL", "PD")[axis],
                        100 * share, ("ppl, descending: true", "pd")[axis])
        if axis == 0:
            named = [("high_ppl", high), ("low_ppl", low)]
        else:
            named = [("low_pd", low), ("high_pd", high)]
        return [_shuffle(self.cfg.seed, name, *_concat(parts)) for name, parts in named]

    def _sorted(self, strategy: StrategyConfig) -> list[Stage]:
        draws = self._cell_draws(strategy)
        idx, epoch, weight = _concat([draws[n] for n in self.corpus.cell_names])
        values = self.corpus.column(strategy.column)[idx]
        order = np.lexsort((idx, epoch, -values if strategy.descending else values))  # last key sorts first
        idx, epoch, weight = idx[order], epoch[order], weight[order]
        cum = np.cumsum(weight, dtype=np.int64)
        total = cum[-1] if len(cum) else 0
        cuts = np.searchsorted(cum, [total * k / strategy.n_stages for k in range(1, strategy.n_stages)])
        bounds = [0, *cuts.tolist(), len(idx)]
        name = f"{strategy.column}_{'desc' if strategy.descending else 'asc'}"
        return [Stage(name if strategy.n_stages == 1 else f"{name}_{k + 1}", idx[a:b], epoch[a:b], weight[a:b])
                for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]

    def _source_weights(self, blend: dict[str, float], tiers: dict[str, str], where: str) -> dict[str, float]:
        """{source or tier: weight} -> {source: weight}; a tier's weight is split by its sources' tokens."""
        sources = self.corpus.source_names
        out: dict[str, float] = {}
        for key, w in blend.items():
            if key in sources:
                out[key] = out.get(key, 0.0) + w
                continue
            members = [s for s in sources if tiers.get(s) == key]
            if not members:
                raise ConfigError(f"{where}: {key!r} is neither a source ({', '.join(sources)}) nor a tier with sources "
                                  f"({', '.join(sorted(set(tiers.values()))) or 'no tiers given'})")
            tokens = np.array([self.source_tokens[sources.index(s)] for s in members], float)
            if not tokens.sum():  # sources of held-out or unscored documents only
                if w > 0:
                    raise FramelmError(f"{where}: tier {key!r} has weight but its sources ({', '.join(members)}) "
                                       f"have no training tokens")
                continue
            for s, t in zip(members, tokens):
                out[s] = out.get(s, 0.0) + w * t / tokens.sum()
        total = sum(out.values())  # check_weights lets a blend sum to 1 +- 1e-3: a phase gets all its tokens
        return {s: v / total for s, v in out.items()} if total > 0 else out

    def _two_phase(self, strategy: StrategyConfig) -> tuple[list[Stage], dict[str, int]]:
        sources = self.corpus.source_names
        bad_tier = [s for s in strategy.tiers if s not in sources]
        if bad_tier:
            raise ConfigError(f"strategy {strategy.label!r}: 'tiers.{bad_tier[0]}' names no source; sources: {', '.join(sources)}")
        blends = [self._source_weights(b, strategy.tiers, f"strategy {strategy.label!r}: blends[{p}]")
                  for p, b in enumerate(strategy.blends)]
        design = float(strategy.design_tokens or self.total)
        if design < self.total:
            raise ConfigError(f"strategy {strategy.label!r}: design_tokens {design:.0f} is below total_tokens {self.total:.0f}; "
                              "a blend can be downsampled to a shorter run, not stretched to a longer one")
        share = {s: sum(b.get(s, 0.0) * p for b, p in zip(blends, strategy.phase_split)) for s in sources}
        # Downsampling a source to total/design of its tokens keeps the epochs it is seen at the
        # design horizon in the actual (shorter) run, up to whole documents. The caps are checked
        # on the sample actually drawn: rounding to documents can shrink it below its target.
        streams = self.source_streams(self.total / design)
        needed = {}
        for i, s in enumerate(sources):
            if share[s] > 0:
                if self.source_tokens[i] == 0:
                    raise FramelmError(f"strategy {strategy.label!r}: source {s!r} has weight but no training tokens")
                pool = streams[s].tokens
                why = f" ({share[s]:.1%} of {self.total:,.0f} tokens"
                if pool < self.source_tokens[i]:
                    why += f", drawn from a {pool:,}-token sample of its {int(self.source_tokens[i]):,} for design_tokens {design:,.0f}"
                needed[s] = (share[s] * self.total / pool, why + ")")
        self._check_caps(strategy, needed)
        stages = []
        for p, (blend, phase) in enumerate(zip(blends, strategy.phase_split)):
            parts = [streams[s].take(w * phase * self.total) for s, w in sorted(blend.items())]
            stages.append(_shuffle(self.cfg.seed, f"phase{p + 1}", *_concat(parts)))
        return stages, {s: streams[s].tokens for s in sources}

    def _yaml(self, strategy: StrategyConfig) -> tuple[list[Stage], dict[str, int]]:
        spec = read_yaml_schedule(strategy.path, self.corpus, self.cfg.weight_tolerance)
        caps = dict(spec.get("epoch_caps", {}))
        caps.update(strategy.epoch_caps)
        strategy = dataclasses.replace(strategy, epoch_caps=caps)
        budgets = [st["tokens"] if "tokens" in st else st["share"] * self.total for st in spec["stages"]]
        by_cell = spec["over"] == "cells"
        names = self.corpus.cell_names if by_cell else self.corpus.source_names
        pool_tokens = self.cell_tokens if by_cell else self.source_tokens
        demand = {n: sum(b * st["mix"].get(n, 0.0) for b, st in zip(budgets, spec["stages"])) for n in names}
        needed = {}
        for i, n in enumerate(names):
            if demand[n] > 0 and pool_tokens[i] == 0:
                raise FramelmError(f"{strategy.path}: {n!r} has weight but no training tokens")
            if demand[n] > 0:
                epochs = demand[n] / pool_tokens[i]
                if by_cell:  # a cell is sampled evenly, so each of its sources repeats as often as the cell
                    for s in np.flatnonzero(self.pair_docs[i]):
                        src = self.corpus.source_names[s]
                        if epochs > needed.get(src, (0.0, ""))[0]:
                            needed[src] = (epochs, f" (through cell {n})")
                else:
                    needed[n] = (epochs, "")
        self._check_caps(strategy, needed)
        streams = self.cell_streams() if by_cell else self.source_streams()
        stages = []
        for st, budget in zip(spec["stages"], budgets):
            parts = [streams[n].take(w * budget) for n, w in sorted(st["mix"].items())]
            stages.append(_shuffle(self.cfg.seed, st["name"], *_concat(parts)))
        return stages, {s: int(t) for s, t in zip(self.corpus.source_names, self.source_tokens)}


YAML_STAGE_KEYS = {"name", "tokens", "share", "mix"}


def read_yaml_schedule(path: str | Path, corpus: Corpus, tolerance: float = 1e-3) -> dict[str, Any]:
    """Read and validate a user schedule:

        stages:
          - name: warmup        # optional; default stage1, stage2, ...
            share: 0.3          # of total_tokens; or `tokens: 3000000`
            mix: {Q3: 0.7, Q4: 0.3}   # cells or sources, weights summing to 1
        epoch_caps: {math: 4}   # optional

    Returns {"stages": [...], "over": "cells" | "sources", "epoch_caps": {...}}.
    """
    data = load_yaml(path)
    unknown = [k for k in data if k not in ("stages", "epoch_caps")]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed: stages, epoch_caps")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list of {{name, tokens or share, mix}}")
    kinds, out, names = set(), [], set()
    for i, st in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(st, dict):
            raise ConfigError(f"{where} must be a mapping with keys name, tokens or share, mix; got {st!r}")
        bad = [k for k in st if k not in YAML_STAGE_KEYS]
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]!r}; allowed: {', '.join(sorted(YAML_STAGE_KEYS))}")
        name = str(st.get("name", f"stage{i + 1}"))
        if name in names:
            raise ConfigError(f"{where}: stage name {name!r} is used twice")
        names.add(name)
        if ("tokens" in st) == ("share" in st):
            raise ConfigError(f"{where} ({name}): give exactly one of 'tokens' (a count) or 'share' (of total_tokens)")
        entry: dict[str, Any] = {"name": name}
        if "tokens" in st:
            if isinstance(st["tokens"], bool) or not isinstance(st["tokens"], (int, float)) or st["tokens"] <= 0:
                raise ConfigError(f"{where}.tokens: must be a positive number, got {st['tokens']!r}")
            entry["tokens"] = float(st["tokens"])
        else:
            if isinstance(st["share"], bool) or not isinstance(st["share"], (int, float)) or not 0 < st["share"] <= 1:
                raise ConfigError(f"{where}.share: must be in (0, 1], got {st['share']!r}")
            entry["share"] = float(st["share"])
        mix = st.get("mix")
        if not isinstance(mix, dict):
            raise ConfigError(f"{where}.mix: must be a mapping {{cell or source: weight}}, got {mix!r}")
        mix = {str(k): v for k, v in mix.items()}
        check_weights(mix, f"{where}.mix", tolerance)
        for key in mix:
            if key in corpus.cell_names:
                kinds.add("cells")
            elif key in corpus.source_names:
                kinds.add("sources")
            else:
                raise ConfigError(f"{where}.mix: {key!r} is neither a cell ({', '.join(corpus.cell_names)}) "
                                  f"nor a source ({', '.join(corpus.source_names)})")
        total = sum(mix.values())
        entry["mix"] = {k: v / total for k, v in mix.items()}
        out.append(entry)
    if len(kinds) > 1:
        raise ConfigError(f"{path}: mixes name both cells and sources; use one kind throughout")
    shares = [e["share"] for e in out if "share" in e]
    if len(shares) == len(out) and abs(sum(shares) - 1) > tolerance:
        raise ConfigError(f"{path}: stage shares sum to {sum(shares):.6g}, not 1 (tolerance {tolerance:g})")
    caps = data.get("epoch_caps") or {}
    if not isinstance(caps, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in caps.values()):
        raise ConfigError(f"{path}: 'epoch_caps' must map sources to positive numbers, got {caps!r}")
    return {"stages": out, "over": kinds.pop(), "epoch_caps": {str(k): float(v) for k, v in caps.items()}}


# -- transitions --------------------------------------------------------------------------


def transition_share(kind: str, u: np.ndarray, steepness: float = 10.0) -> np.ndarray:
    """The next stage's share at relative position u in [0, 1] of a transition window."""
    u = np.asarray(u, float)
    if kind == "hard":
        return (u >= 0.5).astype(float)
    if kind == "linear":
        return np.clip(u, 0.0, 1.0)
    if kind == "logistic":
        lo, hi = 1 / (1 + math.exp(steepness / 2)), 1 / (1 + math.exp(-steepness / 2))
        return np.clip((1 / (1 + np.exp(-steepness * (u - 0.5))) - lo) / (hi - lo), 0.0, 1.0)
    raise ConfigError(f"unknown transition {kind!r}; choose hard, linear or logistic")


def _interleave(wa: np.ndarray, wb: np.ndarray, kind: str, steepness: float) -> np.ndarray:
    """Merge order of a window made of stage A's tail (token weights wa) and stage B's head (wb).

    Returns a permutation of range(len(wa) + len(wb)) (A's documents first in the index space).
    Each document gets the window position u at which its stage's cumulative share reaches its
    token midpoint: B documents follow the integral of the share curve s, A documents that of
    1 - s. Sorting by u interleaves them so the realised token share of B tracks s.
    """
    grid = np.linspace(0.0, 1.0, 2049)
    s = transition_share(kind, grid, steepness)
    cum_b = np.concatenate([[0.0], np.cumsum((s[1:] + s[:-1]) / 2)])
    cum_a = np.concatenate([[0.0], np.cumsum((2 - s[1:] - s[:-1]) / 2)])
    cum_b, cum_a = cum_b / cum_b[-1], cum_a / cum_a[-1]
    fa = (np.cumsum(wa) - wa / 2) / wa.sum()
    fb = (np.cumsum(wb) - wb / 2) / wb.sum()
    ua = np.interp(fa, cum_a, grid)
    ub = np.interp(fb, cum_b, grid)
    return np.argsort(np.concatenate([ua, ub]), kind="stable")


@dataclass
class Stream:
    """A schedule as one document stream: each document's row, epoch, stage and tokens."""

    names: list[str]  # of the stages
    idx: np.ndarray
    epoch: np.ndarray
    stage: np.ndarray  # index into names
    weight: np.ndarray
    # (stage, next stage, documents each gives to the window between them) per smooth boundary
    blends: list[tuple[str, str, int, int]] = dataclasses.field(default_factory=list)


def _docs_within(weight: np.ndarray, tokens: float) -> int:
    """How many leading documents of `weight` fit in `tokens` (their running sum stays <= tokens).
    The running sum grows a doubling block at a time: a window is a small share of a stage."""
    at, before, block = 0, 0, 1 << 16
    while at < len(weight):
        cum = np.cumsum(weight[at:at + block], dtype=np.int64)
        cum += before
        k = int(np.searchsorted(cum, tokens, side="right"))
        if k < len(cum):
            return at + k
        at, before, block = at + len(cum), int(cum[-1]), 2 * block
    return len(weight)


def assemble(stages: list[Stage], kind: str, window: float, steepness: float) -> Stream:
    """Concatenate stages into one stream, blending each boundary.

    Empties `stages` as it goes, so each stage's arrays are freed once copied (at 100 M
    documents the stages and the stream would otherwise be 2.5 GB at once). The epoch array
    starts as untouched zero pages and only stages with repeats write into it."""
    names = [st.name for st in stages]
    tokens = [int(st.weight.sum()) for st in stages]
    head = [0] * len(stages)  # documents of each stage's start that go into the window before it
    tail = [0] * len(stages)
    # A stage without tokens has no window of its own: its neighbours blend with each other.
    filled = [k for k, t in enumerate(tokens) if t > 0]
    following = dict(zip(filled, filled[1:]))
    blends = []
    if kind != "hard" and window > 0:
        for k, j in following.items():
            half = window * min(tokens[k], tokens[j]) / 2
            tail[k] = _docs_within(stages[k].weight[::-1], half)
            head[j] = _docs_within(stages[j].weight, half)
            blends.append((names[k], names[j], tail[k], head[j]))
            if tail[k] == 0 or head[j] == 0:
                tail[k] = head[j] = 0
    n = sum(len(st.idx) for st in stages)
    idx = np.empty(n, np.result_type(np.int32, *(st.idx.dtype for st in stages)))
    weight = np.empty(n, np.result_type(np.int32, *(st.weight.dtype for st in stages)))
    epoch, label = np.zeros(n, np.int32), np.empty(n, _code_dtype(len(stages)))

    def put(out: np.ndarray, part: slice, values: np.ndarray) -> None:
        if out is not epoch or (len(values) and values.max() > 0):
            out[part] = values

    at = 0
    for k in range(len(stages)):
        st = stages[k]
        lo, hi = head[k], len(st.idx) - tail[k]
        part = slice(at, at + hi - lo)
        for out, values in ((idx, st.idx), (epoch, st.epoch), (weight, st.weight)):
            put(out, part, values[lo:hi])
        label[part] = k
        at += hi - lo
        if tail[k]:
            j = following[k]
            nxt, m = stages[j], tail[k] + head[j]
            order = _interleave(st.weight[hi:], nxt.weight[:head[j]], kind, steepness)
            part = slice(at, at + m)
            for out, a, b in ((idx, st.idx, nxt.idx), (epoch, st.epoch, nxt.epoch), (weight, st.weight, nxt.weight)):
                put(out, part, np.concatenate([a[hi:], b[:head[j]]])[order])
            label[part] = np.where(order >= tail[k], j, k)
            at += m
        stages[k] = None  # copied: let its arrays go
    stages.clear()
    return Stream(names, idx, epoch, label, weight, blends)


# -- writing ------------------------------------------------------------------------------


def _shares(tokens: np.ndarray, names: list[str]) -> dict[str, float]:
    total = tokens.sum()
    return {n: round(float(t / total), 6) for n, t in zip(names, tokens) if t > 0} if total else {}


def describe(schedule: Schedule, stream: Stream, docs: np.ndarray, mix: np.ndarray, builder: Builder,
             transition: str) -> dict[str, Any]:
    """The stages.yaml content: nominal stage ranges, steps, composition, epochs per source.

    docs, mix: documents and tokens per (stage, cell, source), as write_order counted them. A
    stage's nominal range holds its own documents' tokens, wherever blending put them."""
    corpus, cfg = builder.corpus, builder.cfg
    per_step = cfg.seq_len * cfg.global_batch
    total_steps = int(mix.sum()) // per_step
    docs = docs.sum(axis=(1, 2))
    stages, start = [], 0
    for k, name in enumerate(stream.names):
        tokens = int(mix[k].sum())
        end = start + tokens
        stages.append({
            "name": name, "start_token": start, "end_token": end,
            "start_step": start // per_step, "end_step": min(-(-end // per_step), total_steps),
            "docs": int(docs[k]), "tokens": tokens,
            "composition": {"cells": _shares(mix[k].sum(axis=1), corpus.cell_names),
                            "sources": _shares(mix[k].sum(axis=0), corpus.source_names)},
        })
        start = end
    scheduled = mix.sum(axis=(0, 1))
    available = builder.source_tokens
    sources = {}
    for i, s in enumerate(corpus.source_names):
        pool = schedule.pool_tokens.get(s, 0)
        sources[s] = {"available_tokens": int(available[i]),
                      "pool_tokens": int(pool), "scheduled_tokens": int(scheduled[i]),
                      "epochs": round(float(scheduled[i] / pool), 6) if pool else 0.0}
    return {
        "strategy": schedule.name, "kind": schedule.kind, "seed": cfg.seed,
        "seq_len": cfg.seq_len, "global_batch": cfg.global_batch, "tokens_per_step": per_step,
        "total_tokens": start, "total_docs": int(len(stream.idx)),
        "total_steps": total_steps, "tail_tokens": start - total_steps * per_step,
        "transition": {"kind": transition, "window": cfg.transition_window if transition != "hard" else 0.0,
                       "steepness": cfg.logistic_steepness if transition == "logistic" else None},
        "sources": sources, "stages": stages,
    }


def write_order(path: Path, corpus: Corpus, stream: Stream, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """order.parquet in row groups, so memory stays bounded by a few chunks of ids. Returns
    the documents and tokens written per (stage, cell, source), which stages.yaml reports.

    `threads` helpers gather the next chunks' ids, sources and cells (random reads, the slow
    part at 100 M documents) while this thread encodes and compresses the current one; all of
    it releases the GIL. source and quadrant go in as dictionary arrays built from the corpus
    codes, so the writer copies indices instead of hashing strings; without the Arrow schema
    in the file they read back as plain strings. Positions count up by one, which delta
    encoding stores in almost no bytes."""
    import pyarrow.parquet as pq
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    category = pa.dictionary(pa.int32(), pa.string())
    # Declared non-null, which spares the writer the definition levels: every scheduled document
    # has every value. Only id stays nullable, for tables handed to Corpus.from_table.
    schema = pa.schema([pa.field(name, t, nullable=name == "id") for name, t in [
        ("position", pa.int64()), ("id", pa.string()), ("stage", pa.int32()), ("source", category),
        ("quadrant", category), ("n_tokens", pa.int64()), ("epoch", pa.int32())]])
    sources, cells = pa.array(corpus.source_names, pa.string()), pa.array(corpus.cell_names, pa.string())
    n_cells, n_sources = len(corpus.cell_names), len(corpus.source_names)
    shape = (len(stream.names), n_cells, n_sources)
    pairs = corpus.pair  # computed here, once, rather than by the first helpers at the same time

    def gather(lo: int) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
        part = slice(lo, lo + WRITE_CHUNK_ROWS)
        docs, stage, weight = stream.idx[part], stream.stage[part], stream.weight[part]
        pair = pairs[docs].astype(np.int64)
        key = stage.astype(np.int64) * (n_cells * n_sources) + pair
        counts = code_totals(key, weight, math.prod(shape))
        cell, source = np.divmod(pair, n_sources)
        return pa.record_batch([
            pa.array(np.arange(lo, lo + len(docs), dtype=np.int64)), corpus.doc_ids(docs).cast(pa.string()),
            pa.array(stage.astype(np.int32)), pa.DictionaryArray.from_arrays(source.astype(np.int32), sources),
            pa.DictionaryArray.from_arrays(cell.astype(np.int32), cells),
            pa.array(weight.astype(np.int64) - 1), pa.array(stream.epoch[part]),
        ], schema=schema), counts

    starts = range(0, max(len(stream.idx), 1), WRITE_CHUNK_ROWS)
    with fsutil.atomic_path(path) as tmp, ThreadPoolExecutor(threads) as pool, pq.ParquetWriter(
            tmp, schema, use_dictionary=["source", "quadrant"],
            # ids are near-random bytes to a block compressor: compressing them costs time, saves
            # little. stage and epoch come in long runs that lz4 squeezes faster than a dictionary.
            compression={"position": "lz4", "id": "none", "stage": "lz4", "source": "lz4",
                         "quadrant": "lz4", "n_tokens": "lz4", "epoch": "lz4"},
            write_statistics=["position", "stage", "n_tokens", "epoch"],  # not the costly dictionary ones
            column_encoding={"position": "DELTA_BINARY_PACKED"}, store_schema=False) as writer:
        pending = deque(pool.submit(gather, lo) for lo in starts[:threads])
        docs, tokens = np.zeros(math.prod(shape), np.int64), np.zeros(math.prod(shape), np.int64)
        for k in tqdm(range(len(starts)), desc=f"write {path.parent.name}/order", unit="chunk"):
            batch, (batch_docs, batch_tokens) = pending.popleft().result()
            if k + threads < len(starts):
                pending.append(pool.submit(gather, starts[k + threads]))
            writer.write_batch(batch)
            docs += batch_docs
            tokens += batch_tokens
    return docs.reshape(shape), tokens.reshape(shape)


# Repeating a source more often than this is rarely meant (repeated data helps little after a
# few epochs) and says the corpus is small for the budget.
MANY_EPOCHS = 4.0


def warn_about_scale(info: dict[str, Any], cfg: ScheduleConfig) -> None:
    """Warn about a schedule too short for its optimizer steps, or one that repeats data a lot.

    Trainers take whole steps of global_batch * seq_len tokens: a schedule of less than one step
    trains nothing, and one with fewer steps than stages cannot give each stage a step (the
    trainer exports then merge stages into one segment)."""
    name, per_step, total = info["strategy"], info["tokens_per_step"], info["total_tokens"]
    steps, n_stages = info["total_steps"], len(info["stages"])
    fix = ("lower schedule.global_batch or schedule.seq_len (--global-batch, --seq-len), or raise schedule.total_tokens "
           "or ingest more data")
    if cfg.total_tokens and abs(total - cfg.total_tokens) > BUDGET_MISS * cfg.total_tokens:
        log.warning("schedule %s: it holds %s tokens for total_tokens = %s (%+.0f%%): budgets are met in whole "
                    "documents, and this corpus's documents are long for so small a budget; raise total_tokens, or "
                    "give each quadrant more documents", name, f"{total:,}", f"{cfg.total_tokens:,}",
                    100 * (total / cfg.total_tokens - 1))
    if steps < 1:
        log.warning("schedule %s: its %s tokens are less than one optimizer step of global_batch * seq_len = %d * %d "
                    "= %s tokens, so a trainer would take no step on it; %s", name, f"{total:,}", cfg.global_batch,
                    cfg.seq_len, f"{per_step:,}", fix)
    elif steps < n_stages:
        log.warning("schedule %s: its %s tokens give only %d whole optimizer steps of %s tokens (global_batch * "
                    "seq_len) for %d stages, so trainers cannot give each stage a step and exports merge stages; %s",
                    name, f"{total:,}", steps, f"{per_step:,}", n_stages, fix)
    for source, entry in info["sources"].items():
        if entry["epochs"] > MANY_EPOCHS and (cfg.max_epochs is None or entry["epochs"] > cfg.max_epochs):
            log.warning("schedule %s: source %r is repeated %.1f times (%s of its %s pool tokens scheduled); "
                        "lower schedule.total_tokens or cap repeats with schedule.max_epochs (or a strategy's "
                        "epoch_caps)", name, source, entry["epochs"], f"{entry['scheduled_tokens']:,}",
                        f"{entry['pool_tokens']:,}")


def warn_about_thin_blends(label: str, stream: Stream, cfg: ScheduleConfig) -> None:
    """A window that holds a few whole documents per side is a hard switch, however smooth the
    curve asked for (and the report's binned share plot still draws it as a ramp)."""
    thin = [f"{a} -> {b} ({n_a} + {n_b} documents)" for a, b, n_a, n_b in stream.blends if min(n_a, n_b) < FEW_BLEND_DOCS]
    if thin:
        log.warning("schedule %s: %s transition window%s of transition_window = %g of the smaller stage hold%s fewer than "
                    "%d whole documents on a side, so the hand-over is (nearly) hard there: %s; raise "
                    "schedule.transition_window for a gradual one", label, cfg.transition, "s" if len(thin) > 1 else "",
                    cfg.transition_window, "" if len(thin) > 1 else "s", FEW_BLEND_DOCS, "; ".join(thin))


def build_schedules(cfg: ScheduleConfig, run: RunDir) -> dict[str, Any]:
    corpus = load_corpus(run)
    builder = Builder(corpus, cfg)
    counts: dict[str, Any] = {"train_docs": int(len(corpus.weight)), "train_tokens": builder.data_tokens}
    lines = []
    for strategy in cfg.strategies:
        out = run.path("schedule", strategy.label)
        order_path, stages_path = out / "order.parquet", out / "stages.yaml"
        if fsutil.is_done(stages_path) and order_path.is_file():
            log.info("schedule %s: already built, skipping", strategy.label)
            info = load_stages(stages_path)
        else:
            schedule = builder.build(strategy)
            transition = cfg.transition if schedule.smooth else "hard"
            stream = assemble(schedule.stages, transition, cfg.transition_window, cfg.logistic_steepness)
            warn_about_thin_blends(strategy.label, stream, cfg)
            docs, mix = write_order(order_path, corpus, stream, cfg.threads)
            info = describe(schedule, stream, docs, mix, builder, transition)
            warn_about_scale(info, cfg)
            del stream
            fsutil.write_yaml(stages_path, info)
            fsutil.mark_done(stages_path)
        counts[f"{strategy.label}_tokens"] = info["total_tokens"]
        lines.append(f"{strategy.label}: " + " -> ".join(f"{s['name']} ({s['tokens']:,} tok, steps {s['start_step']}-{s['end_step']})"
                                                       for s in info["stages"]))
    counts["summary"] = "\n".join(lines)
    return counts


def load_stages(path: str | Path) -> dict[str, Any]:
    """Read a stages.yaml written by this module."""
    import yaml

    return yaml.safe_load(Path(path).read_text())
