"""The `score` stage: per-document perplexity under a weak and a strong reference model, and PD.

Reads  RUN/ingest/documents/part-*.parquet   (id, source, split, text, n_bytes; every split)
       RUN/tokenize/index.parquet       (id, n_tokens: the document's length in the corpus tokenizer)
       RUN/refmodels/{weak,strong}/     (unless weak_model / strong_model name other local HF dirs)
Writes RUN/score/shards/part-NNNNN.parquet (+ hidden .done marker) one shard per `docs_per_shard` documents
       RUN/score/scores.parquet                       the shards in document order, plus n_tokens
       RUN/score/precision.json                       {"dtype"}: the precision every shard is scored in

Every model reads the raw text with its own tokenizer and predicts every token after a leading
BOS (see `framelm.scoring.packing` for the windows used on documents longer than its context).
Per model: summed NLL in nats and predicted tokens; derived ppl_M = exp(nll / tokens),
bpb_M = nll / (ln 2 * n_bytes), pd = (ppl_weak - ppl_strong) / ppl_weak and ppl = the
`ppl_axis` model's PPL. A document with no token under any model gets status "empty" and null
numbers; one with no token under one model only (a tokenizer that drops its characters) gets
"empty_weak" or "empty_strong", that model's numbers and pd null, the other model's kept.

Work is split into shards by document position; shard k belongs to rank k % world_size, so
ranks started by torchrun (or by hand with RANK/WORLD_SIZE) share the work without talking to
each other. The process that finds every shard done writes scores.parquet. `executor: ray`
scores this rank's shards with a Ray Data actor pool instead of in-process.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from framelm import fsutil, launcher
from framelm.config import StageConfig, field
from framelm.ingest import DOCUMENT_GLOB
from framelm.errors import ConfigError, FramelmError
from framelm.progress import progress_bar
from framelm.rundir import RunDir

if TYPE_CHECKING:
    from tqdm import tqdm

    from framelm.scoring.scorer import PreparedDocuments

log = logging.getLogger("framelm")

MODEL_NAMES = ("weak", "strong")
DOC_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("split", pa.string()),
                        ("text", pa.string()), ("n_bytes", pa.int64())])
SHARD_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("split", pa.string()), ("n_bytes", pa.int64()),
    ("weak_nll", pa.float64()), ("weak_tokens", pa.int64()),
    ("strong_nll", pa.float64()), ("strong_tokens", pa.int64()),
    ("ppl_weak", pa.float64()), ("ppl_strong", pa.float64()),
    ("bpb_weak", pa.float64()), ("bpb_strong", pa.float64()),
    ("pd", pa.float64()), ("ppl", pa.float64()), ("status", pa.string()),
])
SCORES_SCHEMA = pa.schema([SHARD_SCHEMA.field(i) for i in range(3)] + [pa.field("n_tokens", pa.int64())]
                          + [SHARD_SCHEMA.field(i) for i in range(3, len(SHARD_SCHEMA))])


@dataclasses.dataclass
class ScoreConfig(StageConfig):
    weak_model: str | None = field(None, help="local Hugging Face causal-LM dir of the weak reference model (default RUN/refmodels/weak)")
    strong_model: str | None = field(None, help="local Hugging Face causal-LM dir of the strong reference model (default RUN/refmodels/strong)")
    ppl_axis: Literal["strong", "weak"] = field("strong", help="whose PPL forms the `ppl` column (the PPL axis of the quadrants)")
    context_tokens: int | None = field(None, help="window length in tokens, BOS included (default: each model's max_position_embeddings)")
    stride_tokens: int | None = field(None, help="new tokens predicted per window after the first; each has >= window - stride tokens of context (default: 3/4 of the window)")
    dtype: Literal["auto", "float32", "bfloat16"] = field("auto", help="model precision; auto = bfloat16 on CUDA, float32 on CPU")
    trust_remote_code: bool = field(False, help="allow model/tokenizer dirs to run their own Python code (only for dirs you trust)")
    docs_per_shard: int = field(2048, help="documents per output shard (the unit of resuming and of distribution)")
    tokens_per_batch: int | None = field(None, help="padded tokens per forward pass (default: 32768 on GPU, 8192 on CPU; lower it on out-of-memory errors)", hash=False)
    logit_chunk_tokens: int = field(4096, help="positions whose vocabulary logits are materialised at once", hash=False)
    device: str = field("auto", help="torch device: auto (CUDA if present, LOCAL_RANK's GPU under torchrun), cpu, cuda:N", hash=False)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field("sdpa", help="attention kernel passed to transformers", hash=False)
    backend: Literal["transformers", "framelm"] = field(
        "transformers", hash=False,
        help="transformers: run the models as transformers builds them (any causal LM); framelm: run plain Llama models "
             "(SmolLM, Llama, framelm's reference models) as framelm's decoder, compiled with block-sparse attention on GPUs; "
             "the scores agree to rounding, so a resumed run may mix shards of both")
    executor: Literal["local", "ray"] = field("local", help="local: this process; ray: a Ray Data actor pool (one GPU per actor when CUDA is present)", hash=False)
    ray_actors: int = field(1, help="number of Ray scoring actors (executor: ray)", hash=False)
    ray_cpus_per_actor: int | None = field(None, help="CPU cores each Ray actor reserves and runs torch on when scoring without a GPU "
                                                      "(default: the cluster's CPUs shared among the actors, at most one machine's)", hash=False)
    rank: int = field(default_factory=launcher.rank, help="this process's rank (default: $RANK from torchrun, else 0)", hash=False)
    world_size: int = field(default_factory=launcher.world_size, help="number of scoring processes (default: $WORLD_SIZE, else 1)", hash=False)

    def validate(self) -> None:
        for key in ("docs_per_shard", "tokens_per_batch", "logit_chunk_tokens", "ray_actors", "ray_cpus_per_actor", "world_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"'{key}' = {getattr(self, key)} must be at least 1")
        if self.context_tokens is not None and self.context_tokens < 2:
            raise ConfigError(f"'context_tokens' = {self.context_tokens} must be at least 2 (BOS and one token)")
        if self.stride_tokens is not None:
            if self.stride_tokens < 1:
                raise ConfigError(f"'stride_tokens' = {self.stride_tokens} must be at least 1")
            if self.context_tokens is not None and self.stride_tokens >= self.context_tokens:
                raise ConfigError(f"'stride_tokens' = {self.stride_tokens} must be smaller than 'context_tokens' = {self.context_tokens}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"'rank' = {self.rank} must be in [0, world_size = {self.world_size})")

    def upstream(self) -> tuple[str, ...]:
        uses_refmodels = self.weak_model is None or self.strong_model is None
        return ("tokenize", "refmodels") if uses_refmodels else ("tokenize",)

    def lock_name(self, key: str) -> str:
        return f"{key}.rank{self.rank}"

    def hashed_dict(self) -> dict[str, Any]:
        # A folder given by path enters the hash by its content (input_fingerprint), so
        # models/weak, ./models/weak and /abs/models/weak are one input.
        data = super().hashed_dict()
        return {**data, **{name: "given" for name in ("weak_model", "strong_model") if data[name] is not None}}

    def input_fingerprint(self, run: RunDir) -> dict[str, Any]:
        """Model folders given by path enter the stage hash by content, so a checkpoint replaced in
        place is scored again. (RUN/refmodels is an upstream stage.)"""
        with run.content_hashes() as hashes:
            return {name: fsutil.model_dir_fingerprint(Path(p).expanduser(), hashes) for name, p in self._given().items() if p}

    def model_dirs(self, run: RunDir) -> dict[str, Path]:
        return {name: Path(p).expanduser() if p else run.path("refmodels", name) for name, p in self._given().items()}

    def _given(self) -> dict[str, str | None]:
        """The model folders given by path (None: the one framelm refmodels trains)."""
        return {"weak": self.weak_model, "strong": self.strong_model}


class DocumentTable:
    """The ingested documents as one sequence, read a slice at a time (row groups, not files)."""

    def __init__(self, run: RunDir):
        folder = run.path("ingest", "documents")
        self.files = sorted(folder.glob(DOCUMENT_GLOB))
        if not self.files:
            raise FramelmError(f"no document files in {folder}; run framelm ingest --run-dir {run.root} first")
        self.row_groups: list[tuple[Path, int, int, int]] = []  # (file, row group, first doc, n rows)
        start = 0
        for f in self.files:
            meta = pq.ParquetFile(f).metadata
            missing = [c for c in DOC_SCHEMA.names if c not in meta.schema.names]
            if missing:
                raise FramelmError(f"{f}: missing column(s) {', '.join(missing)}; expected the ingest schema {', '.join(DOC_SCHEMA.names)}")
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                self.row_groups.append((f, g, start, n))
                start += n
        self.n_docs = start

    def read(self, start: int, stop: int) -> pa.Table:
        pieces = []
        for f, g, first, n in self.row_groups:
            if first + n <= start or first >= stop:
                continue
            table = pq.ParquetFile(f).read_row_group(g, columns=DOC_SCHEMA.names).select(DOC_SCHEMA.names)
            lo, hi = max(start, first) - first, min(stop, first + n) - first
            try:
                pieces.append(table.slice(lo, hi - lo).cast(DOC_SCHEMA))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise FramelmError(f"{f}: columns do not fit the ingest schema {DOC_SCHEMA} ({exc})") from None
        return pa.concat_tables(pieces).combine_chunks() if pieces else DOC_SCHEMA.empty_table()


def shard_path(run: RunDir, k: int) -> Path:
    return run.path("score", "shards", f"part-{k:05d}.parquet")


class ShardScorer:
    """Scores whole shards: reads their documents, runs both models, writes shard + marker."""

    def __init__(self, cfg: ScoreConfig, run: RunDir):
        from framelm.device import resolve_device
        from framelm.scoring.scorer import DocumentScorer, ReferenceModel, resolve_dtype

        self.cfg, self.run = cfg, run
        self.docs = DocumentTable(run)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        _check_precision(run, dtype, f"dtype: {cfg.dtype} on {device}")
        models = [
            ReferenceModel(name, path, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                           attn_implementation=cfg.attn_implementation, max_window_tokens=cfg.context_tokens,
                           stride_tokens=cfg.stride_tokens, backend=cfg.backend)
            for name, path in cfg.model_dirs(run).items()
        ]
        weak, strong = models
        same = (weak.tokenizer_identity == strong.tokenizer_identity if weak.tokenizer_identity and strong.tokenizer_identity
                else weak.tokenizer.get_vocab() == strong.tokenizer.get_vocab())  # slow tokenizers: by their vocabularies
        if not same:
            log.warning("score: the weak and strong models have different tokenizers, so PD compares perplexities per "
                        "token of different token sizes; part of each document's PD then reflects tokenization, not "
                        "capability (bpb_weak and bpb_strong are comparable across tokenizers)")
        self.scorer = DocumentScorer(models, cfg.tokens_per_batch, cfg.logit_chunk_tokens)

    def prepare(self, k: int) -> tuple[pa.Table, PreparedDocuments]:
        """Read and tokenize shard k (CPU only: runs ahead on a background thread)."""
        n = self.cfg.docs_per_shard
        docs = self.docs.read(k * n, min((k + 1) * n, self.docs.n_docs))
        return docs, self.scorer.prepare(docs.column("text").to_pylist())

    def finish(self, k: int, prepared: tuple[pa.Table, PreparedDocuments]) -> int:
        """Run the models on a prepared shard and write it; return its document count."""
        docs, work = prepared
        results = self.scorer.run(work)
        path = shard_path(self.run, k)
        fsutil.write_parquet(path, shard_table(docs, results, self.cfg.ppl_axis))
        fsutil.mark_done(path)
        return docs.num_rows

    def score(self, k: int) -> int:
        return self.finish(k, self.prepare(k))


def shard_table(docs: pa.Table, results: dict[str, tuple[np.ndarray, np.ndarray]], ppl_axis: str) -> pa.Table:
    """One row per document: the per-model sums and everything derived from them."""
    n_bytes = docs.column("n_bytes").to_numpy()
    empty = {name: results[name][1] == 0 for name in MODEL_NAMES}
    columns = {c: docs.column(c) for c in ("id", "source", "split", "n_bytes")}
    with np.errstate(divide="ignore", invalid="ignore"):  # empty documents divide by zero; they are nulled
        ppl = {}
        for name in MODEL_NAMES:
            nll, tokens = results[name]
            ppl[name] = np.exp(nll / tokens)
            for column, values in ((f"{name}_nll", nll), (f"{name}_tokens", tokens), (f"ppl_{name}", ppl[name]),
                                   (f"bpb_{name}", nll / (math.log(2) * n_bytes))):
                columns[column] = pa.array(values, mask=empty[name])
        columns["pd"] = pa.array((ppl["weak"] - ppl["strong"]) / ppl["weak"], mask=empty["weak"] | empty["strong"])
    columns["ppl"] = columns[f"ppl_{ppl_axis}"]
    status = np.where(empty["weak"], np.where(empty["strong"], "empty", "empty_weak"),
                      np.where(empty["strong"], "empty_strong", "ok"))
    columns["status"] = pa.array(status.tolist(), pa.string())
    return pa.table(columns).select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)


def score_shards_local(shards: ShardScorer, todo: list[int], progress: tqdm) -> None:
    """Score shards in order, tokenizing the next shard on a thread while the model runs."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="framelm-tokenize") as pool:
        pending = pool.submit(shards.prepare, todo[0])
        for i, k in enumerate(todo):
            prepared = pending.result()
            if i + 1 < len(todo):
                pending = pool.submit(shards.prepare, todo[i + 1])
            progress.update(shards.finish(k, prepared))


def merge_shards(run: RunDir, n_shards: int) -> pa.Table:
    """Concatenate the shards in document order and add n_tokens from the tokenize index."""
    tables = [pq.read_table(shard_path(run, k)).cast(SHARD_SCHEMA) for k in range(n_shards)]
    scores = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    index_path = run.path("tokenize", "index.parquet")
    if not index_path.is_file():
        raise FramelmError(f"{index_path} not found; run framelm tokenize --run-dir {run.root} first")
    if missing := {"id", "n_tokens"} - set(pq.read_schema(index_path).names):
        raise FramelmError(f"{index_path}: missing column(s) {', '.join(sorted(missing))}; re-run framelm tokenize --run-dir {run.root} --force")
    index = pq.read_table(index_path, columns=["id", "n_tokens"])
    where = pc.index_in(scores.column("id"), value_set=index.column("id"))
    if where.null_count:
        missing = scores.column("id").filter(pc.is_null(where))[0].as_py()
        raise FramelmError(
            f"document id {missing!r} of RUN/ingest/documents is not in {index_path} ({where.null_count} missing); "
            f"the token store is stale: re-run framelm tokenize --run-dir {run.root} --force"
        )
    n_tokens = index.column("n_tokens").take(where).cast(pa.int64())
    scores = scores.add_column(3, "n_tokens", n_tokens)
    return scores.select(SCORES_SCHEMA.names).cast(SCORES_SCHEMA)


def _check_precision(run: RunDir, dtype: Any, why: str) -> None:
    """Keep every shard in one precision. `dtype: auto` means bfloat16 on GPUs and float32 on CPUs,
    so it stays out of the stage hash (a run checked from a CPU-only machine must not clear
    shards scored on GPUs); instead the first scoring process records the precision it resolved,
    and one that would score in another (a resumed run on other hardware, a mixed set of ranks or
    Ray actors) is refused."""
    name = str(dtype).removeprefix("torch.")
    path = run.path("score", "precision.json")
    if path.is_file():
        recorded = fsutil.read_json(path, f"delete {path.parent} to score everything again").get("dtype")
        if recorded != name:
            raise FramelmError(f"{path}: this run's shards are scored in {recorded}, but this process would score in "
                               f"{name} ({why}); set dtype: {recorded} to resume, or delete {path.parent} to score "
                               f"everything again")
    else:
        fsutil.write_json(path, {"dtype": name})


def score_documents(cfg: ScoreConfig, run: RunDir) -> dict[str, Any]:
    docs = DocumentTable(run)
    n_shards = math.ceil(docs.n_docs / cfg.docs_per_shard)
    mine = [k for k in range(n_shards) if k % cfg.world_size == cfg.rank]
    todo = [k for k in mine if not fsutil.is_done(shard_path(run, k))]
    if len(todo) < len(mine):
        log.info("score: %d of this rank's %d shards already done, resuming", len(mine) - len(todo), len(mine))
    if todo:
        if cfg.executor == "ray":
            from framelm.scoring.ray_executor import score_shards_ray

            score_shards_ray(cfg, run, todo)
        else:
            n_todo_docs = sum(min(cfg.docs_per_shard, docs.n_docs - k * cfg.docs_per_shard) for k in todo)
            with progress_bar(total=n_todo_docs, desc=f"score rank {cfg.rank}", unit="doc") as progress:
                score_shards_local(ShardScorer(cfg, run), todo, progress)

    unfinished = [k for k in range(n_shards) if not fsutil.is_done(shard_path(run, k))]
    if unfinished:
        return {"_pending": True, "rank": cfg.rank, "shards_done_by_rank": len(mine), "shards_unfinished": len(unfinished)}
    scores = merge_shards(run, n_shards)
    fsutil.write_parquet(run.path("score", "scores.parquet"), scores)
    n_ok = pc.sum(pc.equal(scores.column("status"), "ok")).as_py() or 0
    return {
        "docs": scores.num_rows,
        "docs_scored": n_ok,
        "docs_empty": scores.num_rows - n_ok,
        "shards": n_shards,
        "weak_tokens": pc.sum(scores.column("weak_tokens")).as_py() or 0,
        "strong_tokens": pc.sum(scores.column("strong_tokens")).as_py() or 0,
        "ppl_axis": cfg.ppl_axis,
    }
