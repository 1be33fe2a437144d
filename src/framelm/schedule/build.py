"""The schedule stage's entry, build_schedules: for each strategy, build its schedule, write
order.parquet and stages.yaml, and warn about schedules that will not train as configured."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from framelm import fsutil
from framelm.columnar import code_totals
from framelm.progress import progress_bar
from framelm.rundir import RunDir
from framelm.schedule.config import ScheduleConfig
from framelm.schedule.corpus import Corpus, load_corpus
from framelm.schedule.strategies import Builder, Schedule
from framelm.schedule.transitions import Stream, assemble

log = logging.getLogger("framelm")

WRITE_CHUNK_ROWS = 1 << 21
BUDGET_MISS = 0.05  # a schedule further than this from total_tokens is warned about
FEW_BLEND_DOCS = 4  # a transition window with fewer documents than this on a side is warned about


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
        "strategy": schedule.name, "kind": schedule.kind, **({"cells": schedule.cells} if schedule.cells else {}), "seed": cfg.seed,
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
        for k in progress_bar(range(len(starts)), desc=f"write {path.parent.name}/order", unit="chunk"):
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
