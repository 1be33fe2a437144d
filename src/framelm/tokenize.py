"""`framelm tokenize`: every ingested document into one flat, memory-mappable token array.

Documents keep ingest order; each one's tokens are followed by EOS. The work is split into
units of one Parquet row group of one ingest shard; worker processes encode their unit in
batches (`Tokenizer.encode_batch_fast`) and write its tokens and per-document lengths; when
all units are done they are concatenated atomically into the final files.

Reads:  RUN/ingest/documents/part-*.parquet, RUN/tokenizer/ (when tokenizer = "trained")
Writes: RUN/tokenize/tokens.bin      flat uint16/uint32 token ids, EOS after every document
        RUN/tokenize/index.parquet   id, source, split, offset, n_tokens (EOS not counted), n_bytes
        RUN/tokenize/meta.json       dtype, vocab_size, eos_id, n_docs, n_tokens (EOS counted), tokenizer
        RUN/tokenize/tokenizer/      copy of the tokenizer used
        RUN/tokenize/shards/         per-unit `.bin` + `.lengths` + `.done` while running; removed at the end
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from framelm import fsutil
from framelm.config import StageConfig, field
from framelm.errors import ConfigError, FramelmError
from framelm.progress import progress_bar
from framelm.rundir import RunDir
from framelm.tokenizer import (EXTRA_TOKENIZER_FILES, TOKENIZER_FILES, copy_tokenizer, document_parts, load_tokenizer,
                               tokenizer_json_path)

log = logging.getLogger("framelm")

TRAINED = "trained"
UINT16_MAX_VOCAB = 1 << 16
INDEX_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("split", pa.string()),
    ("offset", pa.int64()), ("n_tokens", pa.int64()), ("n_bytes", pa.int64()),
])


def available_cpus() -> int:
    """CPU cores this process may use (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclasses.dataclass
class TokenizeConfig(StageConfig):
    tokenizer: str = field(TRAINED, help="'trained' (RUN/tokenizer from `framelm tokenizer train`), or a path to a "
                                         "Hugging Face tokenizer directory or tokenizer.json")
    dtype: Literal["auto", "uint16", "uint32"] = field("auto", help="token id type in tokens.bin; auto = uint16 when the "
                                                                   "vocabulary fits in 65536 ids, else uint32")
    num_workers: int = field(default_factory=available_cpus, hash=False,
                             help="tokenizer processes; the default is one per usable CPU core")
    batch_docs: int = field(256, hash=False, help="documents per encode_batch call")

    def upstream(self) -> tuple[str, ...]:
        return ("ingest", "tokenizer") if self.tokenizer == TRAINED else ("ingest",)

    def input_fingerprint(self, run: RunDir) -> dict[str, Any]:
        """A tokenizer given by path enters the stage hash by content: editing it re-runs tokenize."""
        if self.tokenizer == TRAINED:
            return {}  # the tokenizer stage's hash, an upstream, already covers it
        # Every file load_tokenizer and copy_tokenizer may read: EOS comes from the config files.
        file = tokenizer_json_path(self.tokenizer)
        paths = dict.fromkeys([file, *(file.parent / n for n in TOKENIZER_FILES + EXTRA_TOKENIZER_FILES)])
        with run.content_hashes() as hashes:
            files = {p.name: hashes.fingerprint(p)["sha256"] for p in paths if p.is_file()}
        return {"tokenizer_files": files}

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"'num_workers' = {self.num_workers} must be at least 1")
        if self.batch_docs < 1:
            raise ConfigError(f"'batch_docs' = {self.batch_docs} must be at least 1")
        if not self.tokenizer:
            raise ConfigError("'tokenizer' is empty; use 'trained' or a path to a tokenizer directory or tokenizer.json")


def choose_dtype(requested: str, vocab_size: int) -> np.dtype:
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)
    if requested == "uint16" and vocab_size > UINT16_MAX_VOCAB:
        raise FramelmError(f"dtype uint16 cannot hold this tokenizer's {vocab_size} token ids (at most {UINT16_MAX_VOCAB}); "
                           "use --dtype uint32 or --dtype auto")
    return np.dtype(requested)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One row group of one ingest shard, and where its tokens go."""

    part: Path
    row_group: int
    out: Path  # tokens; `.lengths` beside it holds int64 document lengths (EOS not counted)

    @property
    def lengths(self) -> Path:
        return self.out.with_suffix(".lengths")


def plan_units(parts: list[Path], shard_dir: Path) -> list[Unit]:
    units = []
    for p_index, part in enumerate(parts):
        for g in range(pq.ParquetFile(part).metadata.num_row_groups):
            units.append(Unit(part, g, shard_dir / f"p{p_index:05d}-g{g:05d}.bin"))
    return units


# -- worker side -------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(tokenizer_file: str, eos_id: int, dtype: str, batch_docs: int, serial_batches: bool) -> None:
    if serial_batches:
        # the processes already use every core; threads inside encode_batch would only contend
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    # A document that contains the text "<|endoftext|>" must not gain an EOS token inside it:
    # EOS marks document boundaries in tokens.bin and in everything exported from it.
    tok.encode_special_tokens = True
    _worker.update(tok=tok, eos=eos_id, dtype=np.dtype(dtype), batch=batch_docs)


def encode_documents(tok: Any, texts: list[str], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat tokens with EOS after each document, per-document lengths without EOS)."""
    ids = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()) + len(ids), dtype=dtype)
    ends = np.cumsum(lengths + 1)
    for x, end in zip(ids, ends.tolist()):
        flat[end - 1 - len(x): end - 1] = x
    flat[ends - 1] = eos_id
    return flat, lengths


def _tokenize_unit(unit: Unit) -> None:
    """Encode one unit and write its token and length files, then its done marker."""
    tok, eos, dtype, batch = _worker["tok"], _worker["eos"], _worker["dtype"], _worker["batch"]
    texts = pq.ParquetFile(unit.part).read_row_group(unit.row_group, columns=["text"]).column(0).to_pylist()
    chunks = [encode_documents(tok, texts[i: i + batch], eos, dtype) for i in range(0, len(texts), batch)]
    flat = np.concatenate([c[0] for c in chunks]) if chunks else np.empty(0, dtype)
    lengths = np.concatenate([c[1] for c in chunks]) if chunks else np.empty(0, np.int64)
    fsutil.write_bytes(unit.lengths, lengths.astype("<i8").tobytes())
    fsutil.write_bytes(unit.out, flat.tobytes())
    fsutil.mark_done(unit.out)


# -- the stage ---------------------------------------------------------------------------

def _run_units(pending: list[Unit], n_total: int, worker_args: tuple[Any, ...], num_workers: int) -> None:
    """Tokenize the pending units, in this process or in a pool of `num_workers` processes."""
    with progress_bar(total=n_total, initial=n_total - len(pending), desc="tokenize", unit=" shards") as bar:
        workers = min(num_workers, len(pending))
        if workers <= 1:
            _init_worker(*worker_args, serial_batches=False)
            for unit in pending:
                _tokenize_unit(unit)
                bar.update()
        else:
            # spawn, not fork: the parent may hold tokenizer threads or a torch runtime
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(*worker_args, True)) as pool:
                for _ in pool.imap_unordered(_tokenize_unit, pending):
                    bar.update()


def _concatenate(paths: list[Path], out: Path) -> None:
    with fsutil.atomic_path(out) as tmp, open(tmp, "wb") as dst:
        for p in paths:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)


def _index_table(parts: list[Path], lengths: np.ndarray) -> pa.Table:
    columns = ["id", "source", "split", "n_bytes"]
    docs = pa.concat_tables([pq.read_table(p, columns=columns) for p in parts])
    if docs.num_rows != lengths.size:
        raise FramelmError(f"tokenize: {lengths.size} token lengths for {docs.num_rows} ingested documents; "
                           "the ingest output changed while tokenizing — re-run framelm tokenize --force")
    offsets = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    return pa.table({"id": docs["id"], "source": docs["source"], "split": docs["split"],
                     "offset": offsets, "n_tokens": lengths, "n_bytes": docs["n_bytes"]}, schema=INDEX_SCHEMA)


def tokenize_corpus(cfg: TokenizeConfig, run: RunDir) -> dict[str, Any]:
    """Tokenize RUN/ingest into RUN/tokenize (tokens.bin, index.parquet, meta.json, tokenizer/)."""
    tok_path = run.path("tokenizer") if cfg.tokenizer == TRAINED else Path(cfg.tokenizer).expanduser().resolve()
    tok, eos_id = load_tokenizer(tok_path)
    # One more than the largest id, not the number of tokens: ids may have gaps.
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    dtype = choose_dtype(cfg.dtype, vocab_size)
    parts = document_parts(run)
    tok_file = tokenizer_json_path(tok_path)
    out_dir = run.stage_dir("tokenize")
    # Finished shards of an interrupted run are kept only under the same stage hash, which
    # covers the ingest output, the tokenizer (by upstream hash or content) and the dtype.
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(exist_ok=True)

    units = plan_units(parts, shard_dir)
    # a kill during the final rmtree can leave a unit's marker without its lengths file
    pending = [u for u in units if not (fsutil.is_done(u.out) and u.lengths.is_file())]
    if len(pending) < len(units):
        log.info("tokenize: %d of %d shards were already finished", len(units) - len(pending), len(units))
    _run_units(pending, len(units), (str(tok_file), eos_id, dtype.name, cfg.batch_docs), cfg.num_workers)

    lengths = np.concatenate([np.fromfile(u.lengths, dtype="<i8") for u in units]).astype(np.int64)
    n_tokens = int(lengths.sum()) + lengths.size
    fsutil.write_parquet(out_dir / "index.parquet", _index_table(parts, lengths))
    _concatenate([u.out for u in units], out_dir / "tokens.bin")
    if (out_dir / "tokens.bin").stat().st_size != n_tokens * dtype.itemsize:
        raise FramelmError(f"tokenize: {out_dir / 'tokens.bin'} does not hold the {n_tokens} tokens its shards count; "
                           "a shard file was changed while running — re-run with --force")
    copy_tokenizer(tok_path, out_dir / "tokenizer")
    meta = {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos_id, "n_docs": int(lengths.size),
            "n_tokens": n_tokens, "tokenizer": "tokenize/tokenizer"}
    fsutil.write_json(out_dir / "meta.json", meta)
    shutil.rmtree(shard_dir)  # tokens.bin now holds everything the shards did
    return {"docs": int(lengths.size), "tokens": n_tokens, "doc_tokens": int(lengths.sum()), "dtype": dtype.name,
            "vocab_size": vocab_size, "eos_id": eos_id, "shards": len(units)}
