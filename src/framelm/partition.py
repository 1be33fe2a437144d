"""Split scored documents into FRAME quadrants (or a k x m grid) by PPL and PD.

Reads  RUN/score/scores.parquet (columns id, source, split, n_tokens, ppl, pd, status).
Writes RUN/partition/quadrants.parquet  id, source, split, n_tokens, ppl, pd,
                                        ppl_bin: int8, pd_bin: int8, quadrant: string
       RUN/partition/summary.json       cut points, per cell docs / tokens / token share /
                                        source mix, excluded documents counted by reason.

Cut points are quantiles of the `fit_split` documents (default "train") and are then applied
to every scored document, so held-out and reference documents get labels too. A bin counts
from 0 at the low end; a value equal to a cut point falls in the lower bin. With one cut per
axis the cells carry FRAME's names (Q1 = low PPL/low PD, Q2 = low/high, Q3 = high/low,
Q4 = high/high); finer grids name cells `P{ppl_bin}D{pd_bin}`.

Everything runs inside DuckDB, streaming over the Parquet file with a memory limit, so 100 M
rows fit on a small machine; only the small tables of cut points and per-cell counts ever
reach Python.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from framelm import fsutil
from framelm.config import StageConfig, field
from framelm.errors import ConfigError, FramelmError
from framelm.rundir import RunDir

log = logging.getLogger("framelm")

SCORES = "score/scores.parquet"
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
    threads: int = field(2, help="DuckDB worker threads", hash=False)

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


def cell_name(ppl_bin: int, pd_bin: int, n_ppl_bins: int, n_pd_bins: int) -> str:
    """FRAME's quadrant name in a 2 x 2 split, `P{i}D{j}` in any other grid."""
    if n_ppl_bins == 2 and n_pd_bins == 2:
        return FRAME_NAMES[(ppl_bin, pd_bin)]
    return f"P{ppl_bin}D{pd_bin}"


def _sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _bin_expr(value: str, cuts: str, n_cuts: int) -> str:
    """SQL for the bin of `value` given a list column `cuts`: how many cut points lie below it."""
    return "(" + " + ".join(f"({value} > {cuts}[{i + 1}])::TINYINT" for i in range(n_cuts)) + ")::TINYINT"


def _connect(cfg: PartitionConfig, tmp_dir: Path):
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = {_sql_str(cfg.memory_limit)}")
    con.execute(f"SET threads = {int(cfg.threads)}")
    con.execute(f"SET temp_directory = {_sql_str(str(tmp_dir))}")
    con.execute("SET preserve_insertion_order = true")
    con.execute("SET enable_progress_bar = false")  # it would print into the CLI's table output
    return con


def _check_columns(con, path: Path) -> None:
    import duckdb

    try:
        cols = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_sql_str(str(path))})").fetchall()}
    except duckdb.Error as exc:  # truncated or not Parquet at all
        raise FramelmError(f"{path}: not a readable Parquet file ({exc}); re-run: framelm score --run-dir RUN --force") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise FramelmError(f"{path}: missing column(s) {', '.join(missing)}; expected the score stage's schema "
                           f"({', '.join(REQUIRED_COLUMNS)}, ...). Re-run: framelm score --run-dir RUN")


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
    con = _connect(cfg, tmp_dir)
    try:
        _check_columns(con, scores)
        counts = _partition(con, cfg, scores, out_dir)
    finally:
        con.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return counts


def _partition(con, cfg: PartitionConfig, scores: Path, out_dir: Path) -> dict[str, Any]:
    src = f"read_parquet({_sql_str(str(scores))})"
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
    # One pass counts every document by exclusion reason and by whether it fits the cut points.
    tally = con.execute(f"SELECT reason, split = {_sql_str(cfg.fit_split)}, count(*) FROM "
                        f"(SELECT {reason} AS reason, split FROM {src}) GROUP BY ALL ORDER BY ALL").fetchall()
    excluded = {r: 0 for r, _, _ in tally if r is not None}
    for r, _, n in tally:
        if r is not None:
            excluded[r] += int(n)
    n_scored = sum(int(n) for _, _, n in tally)
    n_valid = sum(int(n) for r, _, n in tally if r is None)
    n_fit = sum(int(n) for r, is_fit, n in tally if r is None and is_fit)
    con.execute(f"CREATE VIEW valid AS SELECT id, source, split, n_tokens, ppl::DOUBLE AS ppl, pd::DOUBLE AS pd "
                f"FROM {src} WHERE ({reason}) IS NULL")
    con.execute(f"CREATE VIEW fit AS SELECT * FROM valid WHERE split = {_sql_str(cfg.fit_split)}")
    if n_fit == 0:
        raise FramelmError(f"{scores}: no document with split '{cfg.fit_split}' has a usable score "
                           f"(excluded: {excluded or 'none'}); cut points need at least one. Check fit_split.")

    n_ppl, n_pd = len(cfg.ppl_quantiles), len(cfg.pd_quantiles)
    source_group = ["source"] if cfg.stratify_by_source else []
    ppl_cuts = _fit_cuts(con, "fit", "ppl", source_group, cfg.ppl_quantiles, cfg.weight)
    con.execute("CREATE TEMP TABLE ppl_cuts (g VARCHAR, cuts DOUBLE[])")
    con.executemany("INSERT INTO ppl_cuts VALUES (?, ?)", [[k[0] if k else ALL_SOURCES, v] for k, v in ppl_cuts.items()])

    def group_of(alias: str) -> str:
        return f"{alias}.source" if cfg.stratify_by_source else _sql_str(ALL_SOURCES)

    con.execute(f"CREATE VIEW binned AS SELECT v.*, {_bin_expr('v.ppl', 'pc.cuts', n_ppl)} AS ppl_bin "
                f"FROM valid v JOIN ppl_cuts pc ON pc.g = {group_of('v')}")

    pd_groups = source_group + (["ppl_bin"] if cfg.split == "nested" else [])
    pd_cuts = _fit_cuts(con, f"(SELECT * FROM binned WHERE split = {_sql_str(cfg.fit_split)})", "pd",
                        pd_groups, cfg.pd_quantiles, cfg.weight)
    con.execute("CREATE TEMP TABLE pd_cuts (g VARCHAR, b TINYINT, cuts DOUBLE[])")
    rows = []
    for key, cuts in pd_cuts.items():
        g = key[0] if cfg.stratify_by_source else ALL_SOURCES
        b = key[-1] if cfg.split == "nested" else -1
        rows.append([g, b, cuts])
    con.executemany("INSERT INTO pd_cuts VALUES (?, ?, ?)", rows)
    pd_join = f"dc.g = {group_of('x')}" + (" AND dc.b = x.ppl_bin" if cfg.split == "nested" else "")
    # Each cell's name looked up from a constant list (cheaper than building the string per row).
    names = [cell_name(i, j, n_ppl + 1, n_pd + 1) for i in range(n_ppl + 1) for j in range(n_pd + 1)]
    name = "[" + ", ".join(map(_sql_str, names)) + f"][1 + {n_pd + 1} * ppl_bin::INTEGER + pd_bin]"
    labelled = (f"SELECT x.id, x.source, x.split, x.n_tokens::BIGINT AS n_tokens, x.ppl, x.pd, x.ppl_bin, "
                f"{_bin_expr('x.pd', 'dc.cuts', n_pd)} AS pd_bin FROM binned x JOIN pd_cuts dc ON {pd_join}")
    select = f"SELECT *, {name} AS quadrant FROM ({labelled})"
    out = out_dir / "quadrants.parquet"
    with fsutil.atomic_path(out) as tmp:
        n_labelled = int(con.execute(
            f"COPY ({select}) TO {_sql_str(str(tmp))} (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1, ROW_GROUP_SIZE 1048576)").fetchone()[0])
    if n_valid > n_labelled:
        # A stratified fit has no cut points for a source (or source x PPL bin) without fit documents.
        excluded["no_fit_documents_in_group"] = n_valid - n_labelled

    per_cell = con.execute(
        f"SELECT quadrant, ppl_bin, pd_bin, split, source, count(*), sum(n_tokens) FROM read_parquet({_sql_str(str(out))}) "
        f"GROUP BY ALL ORDER BY ALL").fetchall()
    summary = _summary(cfg, ppl_cuts, pd_cuts, per_cell, excluded, n_scored, n_labelled)
    fsutil.write_json(out_dir / "summary.json", summary)
    table = format_summary(summary)
    log.info("partition: %d of %d scored documents labelled", n_labelled, n_scored)
    return {"scored": n_scored, "labelled": n_labelled, "excluded": sum(excluded.values()),
            "excluded_by_reason": excluded, "summary": table}


def _summary(cfg: PartitionConfig, ppl_cuts: dict, pd_cuts: dict, per_cell: list[tuple], excluded: dict[str, int],
             n_scored: int, n_labelled: int) -> dict[str, Any]:
    n_ppl, n_pd = len(cfg.ppl_quantiles) + 1, len(cfg.pd_quantiles) + 1
    cells = {}
    for i in range(n_ppl):
        for j in range(n_pd):
            name = cell_name(i, j, n_ppl, n_pd)
            cells[name] = {"name": name, "ppl_bin": i, "pd_bin": j, "docs": 0, "tokens": 0,
                           "doc_share": 0.0, "token_share": 0.0, "source_mix": {}, "docs_by_split": {}}
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
        "grid": {"ppl_bins": n_ppl, "pd_bins": n_pd}, "cut_points": cut_points,
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
                 + (f"; excluded: " + ", ".join(f"{k} {v:,}" for k, v in excluded.items()) if excluded else ""))
    return "\n".join(lines)

