"""Split scored documents into FRAME quadrants (or a k x m grid) by PPL and PD.

Reads  RUN/score/scores.parquet (columns id, source, split, n_tokens, ppl, pd, status).
Writes RUN/partition/quadrants.parquet  quadrant: string, one row per row of scores.parquet, in
                                        its order; null where the document has no usable score
       RUN/partition/summary.json       cut points, per cell docs / tokens / token share /
                                        source mix, excluded documents counted by reason.

quadrants.parquet is an attribute file (see framelm.labels, which writes and reads it): it
holds only the label and lines up with scores.parquet row by row.

Cut points are quantiles of the `fit_split` documents (default "train") and are then applied
to every scored document, so held-out and reference documents get labels too. A bin counts
from 0 at the low end; a value equal to a cut point falls in the lower bin. With one cut per
axis the cells carry FRAME's names (Q1 = low PPL/low PD, Q2 = low/high, Q3 = high/low,
Q4 = high/high); finer grids name cells `P{ppl_bin}D{pd_bin}`.

The numeric and categorical columns are read once into numpy (about 29 bytes a row); labels,
docs-weighted cut points (DuckDB's quantile_cont: linear interpolation at (n - 1) q) and
per-cell counts are computed there. DuckDB only names the exclusion reasons (when some
document is excluded) and fits tokens-weighted cut points.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from framelm import fsutil
from framelm.columnar import Categories, code_totals, row_groups
from framelm.config import StageConfig, field
from framelm.errors import ConfigError, FramelmError
from framelm.labels import LABELS, LABELS_FORMAT, SCORES, write_labels
from framelm.rundir import RunDir
from framelm.sql import connect, parquet_columns, sql_str

log = logging.getLogger("framelm")

REQUIRED_COLUMNS = ("id", "source", "split", "n_tokens", "ppl", "pd", "status")
ALL_SOURCES = "*"  # group name of the cut points when they are not stratified by source
FRAME_NAMES = {(0, 0): "Q1", (0, 1): "Q2", (1, 0): "Q3", (1, 1): "Q4"}


@dataclass
class PartitionConfig(StageConfig):
    split: Literal["nested", "independent"] = field(
        "nested", help="nested: PD cut points are fit inside each PPL bin (equal cells); independent: over all documents")
    ppl_quantiles: list[float] = field(default_factory=lambda: [0.5], help="quantiles (0..1, increasing) that cut the PPL axis; k cuts give k+1 bins")
    pd_quantiles: list[float] = field(default_factory=lambda: [0.5], help="quantiles (0..1, increasing) that cut the PD axis")
    stratify_by_source: bool = field(False, help="fit cut points separately inside each source")
    weight: Literal["docs", "tokens"] = field(
        "docs", help="docs: quantiles of documents; tokens: quantiles of tokens (equal tokens per cell rather than equal documents)")
    fit_split: str = field("train", help="documents of this split fit the cut points; every scored document is labelled")
    memory_limit: str = field("4GB", help="DuckDB memory limit; larger tables spill to disk", hash=False)
    threads: int = field(2, help="worker threads (DuckDB's, and numpy work split across cores)", hash=False)

    def validate(self) -> None:
        for key in ("ppl_quantiles", "pd_quantiles"):
            qs = getattr(self, key)
            if not qs:
                raise ConfigError(f"'{key}' must list at least one quantile, e.g. [0.5]")
            if any(not 0 < q < 1 for q in qs):
                raise ConfigError(f"'{key}' = {qs}: every quantile must lie strictly between 0 and 1")
            if any(b <= a for a, b in zip(qs, qs[1:])):
                raise ConfigError(f"'{key}' = {qs}: quantiles must be strictly increasing")
            if len(qs) > 126:
                raise ConfigError(f"'{key}' has {len(qs)} cuts; at most 126 fit an int8 bin")
        if self.threads < 1:
            raise ConfigError(f"'threads' must be >= 1, got {self.threads}")

    def hashed_dict(self) -> dict[str, Any]:
        # The version of what the stage writes: a run directory partitioned by a framelm whose
        # quadrants.parquet held ids and scores re-runs the stage instead of failing its readers.
        return {**super().hashed_dict(), "output_format": LABELS_FORMAT}


def cell_name(ppl_bin: int, pd_bin: int, n_ppl_bins: int, n_pd_bins: int) -> str:
    """FRAME's quadrant name in a 2 x 2 split, `P{i}D{j}` in any other grid."""
    if n_ppl_bins == 2 and n_pd_bins == 2:
        return FRAME_NAMES[(ppl_bin, pd_bin)]
    return f"P{ppl_bin}D{pd_bin}"


def _grid_cells(cfg: PartitionConfig) -> list[tuple[str, int, int]]:
    """The cells (name, ppl_bin, pd_bin) of cfg's grid in label-code order: code = ppl_bin * pd_bins + pd_bin."""
    n_ppl, n_pd = len(cfg.ppl_quantiles) + 1, len(cfg.pd_quantiles) + 1
    return [(cell_name(i, j, n_ppl, n_pd), i, j) for i in range(n_ppl) for j in range(n_pd)]


def _bin_expr(value: str, cuts: str, n_cuts: int) -> str:
    """SQL for the bin of `value` given a list column `cuts`: how many cut points lie below it."""
    return "(" + " + ".join(f"({value} > {cuts}[{i + 1}])::TINYINT" for i in range(n_cuts)) + ")::TINYINT"


def _fit_cuts(con, table: str, value: str, groups: list[str], quantiles: list[float], weight: str) -> dict[tuple, list[float]]:
    """Cut points of `value` per group of the fit documents in `table`.

    docs weighting: continuous quantiles (interpolated between neighbours), so a median splits
    an even count exactly in half. tokens weighting: for quantile q the cut is the smallest
    value at which the running token count (documents sorted by value) reaches q of the group's
    tokens, so each bin holds q's share of tokens up to one document.
    """
    aliases = [f"g{i}" for i in range(len(groups))]
    keys = "".join(f"{g} AS {a}, " for g, a in zip(groups, aliases))
    key_cols = "".join(f"{a}, " for a in aliases)
    group_by = f"GROUP BY {', '.join(aliases)}" if groups else ""
    if weight == "docs":
        inner = f"SELECT {keys}{value} AS v FROM {table}"
        agg = "quantile_cont(v, [" + ", ".join(repr(float(q)) for q in quantiles) + "])"
    else:
        part = f"PARTITION BY {', '.join(groups)}" if groups else ""
        inner = (f"SELECT {keys}{value} AS v, "
                 f"SUM(n_tokens) OVER ({part} ORDER BY {value} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS cum, "
                 f"SUM(n_tokens) OVER ({part}) AS total FROM {table}")
        agg = "[" + ", ".join(f"MIN(v) FILTER (WHERE cum >= {float(q)!r} * total)" for q in quantiles) + "]"
    sql = f"SELECT {key_cols}{agg} FROM ({inner}) {group_by}"
    out = {}
    for row in con.execute(sql).fetchall():
        out[tuple(row[:-1])] = [float(c) for c in row[-1]]
    return out


def partition_documents(cfg: PartitionConfig, run: RunDir) -> dict[str, Any]:
    scores = run.path(SCORES)
    if not scores.is_file():
        raise FramelmError(f"{scores} not found; run the score stage first: framelm score --run-dir {run.root}")
    out_dir = run.stage_dir("partition")
    tmp_dir = out_dir / ".duckdb-tmp"
    con = connect(cfg.memory_limit, cfg.threads, tmp_dir)
    try:
        parquet_columns(con, scores, REQUIRED_COLUMNS, f"re-run: framelm score --run-dir {run.root} --force")
        counts = _partition(con, cfg, scores, out_dir)
    finally:
        con.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return counts


def _valid_mask(col) -> Any:
    import numpy as np
    import pyarrow.compute as pc

    if col.null_count == 0:
        return np.ones(len(col), bool)
    return pc.is_valid(col).to_numpy(zero_copy_only=False)


def _numbers(col, dtype) -> Any:
    import pyarrow.compute as pc

    if col.null_count:
        col = pc.fill_null(col, 0)
    return col.to_numpy().astype(dtype, copy=False)


def _load_numeric(scores: Path, fit_split: str) -> dict[str, Any]:
    """One pass over the numeric and categorical columns of scores.parquet into numpy arrays."""
    import numpy as np
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(scores, read_dictionary=["source", "split", "status"])
    n = parquet.metadata.num_rows
    ppl, pd_ = np.empty(n, np.float64), np.empty(n, np.float64)
    n_tokens = np.empty(n, np.int32)  # widened if some value does not fit 32 bits
    source, split = np.empty(n, np.int16), np.empty(n, np.int16)  # widened if some file has > 32767 values
    valid = np.empty(n, bool)
    sources, splits, statuses = Categories(), Categories(), Categories()
    at = 0
    for table in row_groups(parquet, ["source", "split", "n_tokens", "ppl", "pd", "status"]):
        sl = slice(at, at + table.num_rows)
        ok = statuses.codes(table.column("status")) == statuses.code_of("ok")  # a null status is -1, never ok
        source_codes, split_codes = sources.codes(table.column("source")), splits.codes(table.column("split"))
        if len(sources.values) > np.iinfo(source.dtype).max:
            source = source.astype(np.int32)
        if len(splits.values) > np.iinfo(split.dtype).max:
            split = split.astype(np.int32)
        source[sl], split[sl] = source_codes, split_codes
        ok &= (source_codes >= 0) & (split_codes >= 0)
        for name in ("n_tokens", "ppl", "pd"):
            ok &= _valid_mask(table.column(name))
        tokens = _numbers(table.column("n_tokens"), np.int64)
        if len(tokens) and not np.iinfo(n_tokens.dtype).min <= tokens.min() <= tokens.max() <= np.iinfo(n_tokens.dtype).max:
            n_tokens = n_tokens.astype(np.int64)
        n_tokens[sl] = tokens
        ppl[sl] = _numbers(table.column("ppl"), np.float64)
        pd_[sl] = _numbers(table.column("pd"), np.float64)
        ok &= np.isfinite(ppl[sl]) & np.isfinite(pd_[sl])
        valid[sl] = ok
        at += table.num_rows
    source[source < 0] = 0  # a null source or split excludes its row; any code keeps the arrays indexable
    split[split < 0] = 0
    fit_code = splits.code_of(fit_split)
    return {"n": n, "ppl": ppl, "pd": pd_, "n_tokens": n_tokens, "source": source, "split": split, "valid": valid,
            "fit": valid & (split == fit_code), "source_names": sources.values, "split_names": splits.values}


def _quantile_cont(values: Any, quantiles: list[float]) -> list[float]:
    """DuckDB's quantile_cont: at position (n - 1) q, lo + (hi - lo) * frac. Reorders `values` in place."""
    n = len(values)
    pos = [(n - 1) * float(q) for q in quantiles]
    kth = sorted({int(math.floor(p)) for p in pos} | {int(math.ceil(p)) for p in pos})
    values.partition(kth)  # callers pass a fresh copy: no second one
    part = values
    out = []
    for p in pos:
        lo_i, hi_i = int(math.floor(p)), int(math.ceil(p))
        lo, hi = float(part[lo_i]), float(part[hi_i])
        out.append(lo if lo_i == hi_i else lo + (hi - lo) * (p - lo_i))
    return out


def _numpy_cuts(values: Any, fit: Any, group_codes: list[tuple[Any, Any]], quantiles: list[float],
                threads: int = 1) -> dict[tuple, list[float]]:
    """Docs-weighted cut points of `values` over `fit` rows per group, `threads` groups at a time.

    group_codes: (key-part values, codes array) per grouping column; a group with no fit row has no cuts."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    if not group_codes:
        v = values[fit]
        return {(): _quantile_cont(v, quantiles)} if len(v) else {}
    sizes = [len(names) for names, _ in group_codes]
    n_groups = math.prod(sizes)
    # Built in place: at 100 M rows every temporary array costs a second of fresh memory.
    key = np.zeros(len(values), np.int16 if n_groups < 1 << 15 else np.int32 if n_groups < 1 << 31 else np.int64)
    for (names, codes), size in zip(group_codes, sizes):
        key *= size
        key += codes
    key[~fit] = n_groups  # rows outside the fit land in an overflow slot
    counts = np.bincount(key, minlength=n_groups + 1)[:n_groups]

    def group_cuts(k: int) -> tuple[tuple, list[float]]:
        group, rest = [], k
        for size in reversed(sizes):
            rest, r = divmod(rest, size)
            group.append(r)
        group.reverse()
        # the mask, the copy and the selection release the GIL: groups run side by side
        return tuple(names[c] for (names, _), c in zip(group_codes, group)), _quantile_cont(values[key == k], quantiles)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return dict(sorted(pool.map(group_cuts, np.flatnonzero(counts).tolist())))


def _partition(con, cfg: PartitionConfig, scores: Path, out_dir: Path) -> dict[str, Any]:
    src = f"read_parquet({sql_str(str(scores))})"
    # Why a document has no usable score; NULL means it is usable. DuckDB orders NaN above
    # every number, so NaN must go before any quantile or comparison. isnan()/isinf() are not
    # used: DuckDB folds them to false from Parquet min/max statistics, which omit NaN.
    reason = """CASE
        WHEN status IS NULL THEN 'no_status'
        WHEN status <> 'ok' THEN status
        WHEN n_tokens IS NULL THEN 'missing_n_tokens'
        WHEN ppl IS NULL THEN 'missing_ppl'
        WHEN NOT isfinite(ppl) THEN (CASE WHEN ppl::VARCHAR = 'nan' THEN 'nan_ppl' ELSE 'inf_ppl' END)
        WHEN pd IS NULL THEN 'missing_pd'
        WHEN NOT isfinite(pd) THEN (CASE WHEN pd::VARCHAR = 'nan' THEN 'nan_pd' ELSE 'inf_pd' END)
        WHEN source IS NULL THEN 'missing_source'
        WHEN split IS NULL THEN 'missing_split'
    END"""
    # Numeric columns in numpy (one pass); labels, docs-weighted cut points and per-cell counts
    # are computed there. DuckDB only names exclusion reasons (when some row is excluded) and
    # fits tokens-weighted cut points. The ids are never read: the label file lines up by row.
    data = _load_numeric(scores, cfg.fit_split)
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # pages Arrow kept from reading: not needed again
    n_scored = data["n"]
    n_valid = int(data["valid"].sum())
    n_fit = int(data["fit"].sum())
    excluded: dict[str, int] = {}
    if n_valid < n_scored:
        tally = con.execute(f"SELECT reason, count(*) FROM (SELECT {reason} AS reason FROM {src}) "
                            f"WHERE reason IS NOT NULL GROUP BY ALL ORDER BY ALL").fetchall()
        excluded = {r: int(n) for r, n in tally}
    con.execute(f"CREATE VIEW valid AS SELECT source, split, n_tokens, ppl::DOUBLE AS ppl, pd::DOUBLE AS pd "
                f"FROM {src} WHERE ({reason}) IS NULL")
    con.execute(f"CREATE VIEW fit AS SELECT * FROM valid WHERE split = {sql_str(cfg.fit_split)}")
    if n_fit == 0:
        raise FramelmError(f"{scores}: no document with split '{cfg.fit_split}' has a usable score "
                           f"(excluded: {excluded or 'none'}); cut points need at least one. Check fit_split.")

    n_ppl_cuts = len(cfg.ppl_quantiles)
    source_group = ["source"] if cfg.stratify_by_source else []
    src_codes = [(data["source_names"], data["source"])] if cfg.stratify_by_source else []
    if cfg.weight == "docs":
        ppl_cuts = _numpy_cuts(data["ppl"], data["fit"], src_codes, cfg.ppl_quantiles, cfg.threads)
    else:
        ppl_cuts = _fit_cuts(con, "fit", "ppl", source_group, cfg.ppl_quantiles, cfg.weight)
    ppl_bin, _ = _bins(cfg, data, ppl_cuts, None)
    if cfg.weight == "docs":
        bin_codes = [(list(range(n_ppl_cuts + 1)), ppl_bin)] if cfg.split == "nested" else []
        pd_cuts = _numpy_cuts(data["pd"], data["fit"], src_codes + bin_codes, cfg.pd_quantiles, cfg.threads)
    else:
        con.execute("CREATE TEMP TABLE ppl_cuts (g VARCHAR, cuts DOUBLE[])")
        con.executemany("INSERT INTO ppl_cuts VALUES (?, ?)", [[k[0] if k else ALL_SOURCES, v] for k, v in ppl_cuts.items()])
        group = "v.source" if cfg.stratify_by_source else sql_str(ALL_SOURCES)
        con.execute(f"CREATE VIEW binned AS SELECT v.*, {_bin_expr('v.ppl', 'pc.cuts', n_ppl_cuts)} AS ppl_bin "
                    f"FROM valid v JOIN ppl_cuts pc ON pc.g = {group}")
        pd_groups = source_group + (["ppl_bin"] if cfg.split == "nested" else [])
        pd_cuts = _fit_cuts(con, f"(SELECT * FROM binned WHERE split = {sql_str(cfg.fit_split)})", "pd",
                            pd_groups, cfg.pd_quantiles, cfg.weight)
    ppl_bin, labelled = _bins(cfg, data, ppl_cuts, pd_cuts, ppl_bin)
    pd_bin = labelled.pop("pd_bin")
    keep = labelled.pop("keep")
    excluded.update(labelled.pop("unlabelled"))
    if excluded.get("no_fit_documents_in_ppl_bin"):
        # Nested PD cuts come from the fit documents of each PPL bin; ties at a PPL cut can leave one empty.
        log.warning("partition: %d documents fall in a PPL bin that holds no '%s' documents, so it has no PD cut "
                    "points and they get no label (many scores equal to a PPL cut point put every fit document "
                    "in the lower bin); see %s", excluded["no_fit_documents_in_ppl_bin"], cfg.fit_split,
                    out_dir / "summary.json")
    del data["valid"], data["fit"]
    n_labelled, per_cell = _label(cfg, scores, out_dir / Path(LABELS).name, data, ppl_bin, pd_bin, keep)
    del data

    summary = _summary(cfg, ppl_cuts, pd_cuts, per_cell, excluded, n_scored, n_labelled)
    fsutil.write_json(out_dir / "summary.json", summary)
    table = format_summary(summary)
    log.info("partition: %d of %d scored documents labelled", n_labelled, n_scored)
    return {"scored": n_scored, "labelled": n_labelled, "excluded": sum(excluded.values()),
            "excluded_by_reason": excluded, "summary": table}


def _bins(cfg: PartitionConfig, data: dict, ppl_cuts: dict, pd_cuts: dict | None, ppl_bin: Any = None) -> tuple[Any, dict]:
    """ppl_bin of every row (and with pd_cuts: pd_bin and which rows get a label).

    A bin counts the cut points strictly below the value (a value equal to a cut falls low).
    Rows go through in slices, cfg.threads at a time, so that the per-row cut points stay small
    temporaries and both cores work."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    def each_slice(fn: Any) -> None:
        with ThreadPoolExecutor(cfg.threads) as pool:
            list(pool.map(fn, slices))

    n_ppl_cuts, n_pd_cuts = len(cfg.ppl_quantiles), len(cfg.pd_quantiles)
    strat, nested = cfg.stratify_by_source, cfg.split == "nested"
    names = data["source_names"] if strat else [ALL_SOURCES]
    gindex = {g: i for i, g in enumerate(names)}
    group = data["source"] if strat else np.broadcast_to(np.int16(0), (data["n"],))
    slices = [slice(lo, lo + BIN_SLICE_ROWS) for lo in range(0, data["n"], BIN_SLICE_ROWS)]
    if ppl_bin is None:
        P = np.full((len(names), n_ppl_cuts), np.nan)
        for k, v in ppl_cuts.items():
            P[gindex[k[0]] if strat else 0] = v
        ppl_bin = np.zeros(data["n"], np.int8)

        def ppl_slice(sl: slice) -> None:
            cuts = P[group[sl]]
            for i in range(n_ppl_cuts):  # NaN (no cuts) compares false; such rows are dropped below
                ppl_bin[sl] += data["ppl"][sl] > cuts[:, i]

        each_slice(ppl_slice)
    if pd_cuts is None:
        return ppl_bin, {}
    has_ppl = np.zeros(len(names), bool)
    for k in ppl_cuts:
        has_ppl[gindex[k[0]] if strat else 0] = True
    D = np.full((len(names), n_ppl_cuts + 1, n_pd_cuts), np.nan)
    for k, v in pd_cuts.items():
        gi = gindex[k[0]] if strat else 0
        if nested:
            D[gi, int(k[-1])] = v
        else:
            D[gi, :] = v
    has_cuts = (~np.isnan(D).any(axis=2) & has_ppl[:, None]).reshape(-1)
    D = D.reshape(-1, n_pd_cuts)
    keep, pd_bin = np.empty(data["n"], bool), np.zeros(data["n"], np.int8)

    def pd_slice(sl: slice) -> None:
        cell_group = group[sl].astype(np.int32) * (n_ppl_cuts + 1) + ppl_bin[sl]
        keep[sl] = data["valid"][sl] & has_cuts[cell_group]
        cuts = D[cell_group]
        for j in range(n_pd_cuts):
            pd_bin[sl] += data["pd"][sl] > cuts[:, j]

    each_slice(pd_slice)
    unlabelled: dict[str, int] = {}
    if not has_cuts.all():  # rare: say why rows go without a label
        lost = data["valid"] & ~keep
        no_source = int((lost & ~has_ppl[group]).sum())
        unlabelled = {"no_fit_documents_in_source": no_source, "no_fit_documents_in_ppl_bin": int(lost.sum()) - no_source}
    return ppl_bin, {"pd_bin": pd_bin, "keep": keep, "unlabelled": {k: v for k, v in unlabelled.items() if v}}


BIN_SLICE_ROWS = 1 << 20
WRITE_BATCH_ROWS = 1 << 20


def _label(cfg: PartitionConfig, scores: Path, out: Path, data: dict, ppl_bin: Any, pd_bin: Any,
           keep: Any) -> tuple[int, list[tuple]]:
    """Write the label file and count the labelled rows. Returns (rows labelled, per
    (quadrant, ppl_bin, pd_bin, split, source): docs, tokens)."""
    import numpy as np

    from framelm.columnar import in_background

    cells = _grid_cells(cfg)
    cell = ppl_bin.astype(np.int16)
    cell *= len(cfg.pd_quantiles) + 1
    cell += pd_bin
    source_names, split_names = data["source_names"], data["split_names"]
    ns, nsrc = max(len(split_names), 1), max(len(source_names), 1)
    size = len(cells) * ns * nsrc

    def key(part: slice) -> Any:
        """One code per (cell, split, source); unlabelled rows land in an overflow slot."""
        k = cell[part].astype(np.int32 if size < 1 << 31 else np.int64)
        k *= ns
        k += data["split"][part]
        k *= nsrc
        k += data["source"][part]
        k[~keep[part]] = size
        return k

    stop = threading.Event()

    def codes() -> Iterator[Any]:
        for lo in range(0, data["n"], WRITE_BATCH_ROWS):
            if stop.is_set():
                raise FramelmError(f"{out}: not written, the partition failed")
            yield np.where(keep[lo:lo + WRITE_BATCH_ROWS], cell[lo:lo + WRITE_BATCH_ROWS], np.int16(-1))

    # A helper thread writes the labels (pyarrow releases the GIL) while this one counts; the
    # file takes its name only once both have succeeded.
    with fsutil.atomic_path(out) as tmp:
        written = in_background(lambda: write_labels(tmp, scores, cells, codes()))
        try:
            docs, tokens = code_totals(key, data["n_tokens"], size + 1)
        except BaseException:
            stop.set()
            written.exception()  # wait for the writer, so that no file appears after the cleanup
            raise
        written.result()
    per_cell = []
    for k in np.flatnonzero(docs[:size]):
        c, rest = divmod(int(k), ns * nsrc)
        sp, so = divmod(rest, nsrc)
        per_cell.append((*cells[c], split_names[sp], source_names[so], int(docs[k]), int(tokens[k])))
    per_cell.sort()
    return int(docs[:size].sum()), per_cell


def _summary(cfg: PartitionConfig, ppl_cuts: dict, pd_cuts: dict, per_cell: list[tuple], excluded: dict[str, int],
             n_scored: int, n_labelled: int) -> dict[str, Any]:
    cells = {name: {"name": name, "ppl_bin": i, "pd_bin": j, "docs": 0, "tokens": 0,
                    "doc_share": 0.0, "token_share": 0.0, "source_mix": {}, "docs_by_split": {}}
             for name, i, j in _grid_cells(cfg)}
    source_tokens: dict[str, dict[str, int]] = {name: {} for name in cells}
    for name, _, _, split, source, docs, tokens in per_cell:
        cell = cells[name]
        cell["docs_by_split"][split] = cell["docs_by_split"].get(split, 0) + int(docs)
        if split == cfg.fit_split:
            cell["docs"] += int(docs)
            cell["tokens"] += int(tokens)
            source_tokens[name][source] = source_tokens[name].get(source, 0) + int(tokens)
    total_docs = sum(c["docs"] for c in cells.values())
    total_tokens = sum(c["tokens"] for c in cells.values())
    for name, cell in cells.items():
        cell["doc_share"] = cell["docs"] / total_docs if total_docs else 0.0
        cell["token_share"] = cell["tokens"] / total_tokens if total_tokens else 0.0
        by_source = source_tokens[name]
        cell["source_mix"] = {s: t / cell["tokens"] if cell["tokens"] else 0.0
                              for s, t in sorted(by_source.items(), key=lambda kv: (-kv[1], kv[0]))}
    cut_points = [{"axis": "ppl", "source": k[0] if k else None, "ppl_bin": None, "cuts": v} for k, v in sorted(ppl_cuts.items())]
    for key, cuts in sorted(pd_cuts.items()):
        cut_points.append({"axis": "pd", "source": key[0] if cfg.stratify_by_source else None,
                           "ppl_bin": int(key[-1]) if cfg.split == "nested" else None, "cuts": cuts})
    return {
        "split": cfg.split, "weight": cfg.weight, "stratify_by_source": cfg.stratify_by_source,
        "fit_split": cfg.fit_split, "ppl_quantiles": cfg.ppl_quantiles, "pd_quantiles": cfg.pd_quantiles,
        "grid": {"ppl_bins": len(cfg.ppl_quantiles) + 1, "pd_bins": len(cfg.pd_quantiles) + 1}, "cut_points": cut_points,
        "cells": list(cells.values()), "scored": n_scored, "labelled": n_labelled, "excluded": excluded,
        "fit_docs": total_docs, "fit_tokens": total_tokens,
    }


def format_summary(summary: dict[str, Any], top_sources: int = 3) -> str:
    """A plain-text table of the cells (fit split): docs, tokens, shares and main sources."""
    header = f"{'cell':<8}{'docs':>12}{'doc %':>8}{'tokens':>15}{'token %':>9}  main sources (token share)"
    lines = [f"partition ({summary['split']}, {summary['weight']}-weighted"
             f"{', per source' if summary['stratify_by_source'] else ''}; {summary['fit_split']} documents)", header]
    for c in summary["cells"]:
        mix = ", ".join(f"{s} {share:.0%}" for s, share in list(c["source_mix"].items())[:top_sources])
        lines.append(f"{c['name']:<8}{c['docs']:>12,}{c['doc_share']:>8.1%}{c['tokens']:>15,}{c['token_share']:>9.1%}  {mix}")
    excluded = summary["excluded"]
    lines.append(f"labelled {summary['labelled']:,} of {summary['scored']:,} scored documents"
                 + ("; excluded: " + ", ".join(f"{k} {v:,}" for k, v in excluded.items()) if excluded else ""))
    return "\n".join(lines)

