"""Read access to framelm's token folders: the token store written by `framelm tokenize` and the
stream written by `framelm export` (both a tokens.bin described by a meta.json).

    store = TokenStore.open(run)          # a RunDir, a run directory path or RUN/tokenize
    store.tokens                          # np.memmap of every token (EOS after each document)
    store.index                           # pyarrow Table: id, source, split, offset, n_tokens, n_bytes
                                          # (read on first use: the export needs only the tokens)
    store.doc(i), store.doc_by_id("x")    # one document's tokens, EOS not included

Reads: RUN/tokenize/meta.json, tokens.bin, index.parquet (or a stream's meta.json and
tokens.bin, through read_tokens). Writes nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.rundir import RunDir

TOKEN_DTYPES = ("uint16", "uint32")
# The meta.json keys every token folder has; a store adds n_docs, a stream its stages.
META_INT_KEYS = ("n_tokens", "eos_id", "vocab_size")


@dataclass(frozen=True)
class StageRange:
    """Stage `name` holds tokens [start_token, end_token) of a stream."""

    name: str
    start_token: int
    end_token: int


def check_stages(stages: list[StageRange], n_tokens: int, where: str) -> None:
    """Stages must tile [0, n_tokens) in order."""
    position = 0
    for i, s in enumerate(stages):
        if s.start_token != position or s.end_token < s.start_token:
            raise FramelmError(f"{where}: stages[{i}] ({s.name}) spans [{s.start_token}, {s.end_token}) but should start at token {position}")
        position = s.end_token
    if position != n_tokens:
        raise FramelmError(f"{where}: stages end at token {position} but the stream has {n_tokens} tokens")


class TokenStore:
    """A finished token store: memory-mapped tokens, meta.json and the document index."""

    def __init__(self, directory: Path, meta: dict[str, Any], tokens: np.ndarray):
        self.directory = directory
        self.meta = meta
        self.tokens = tokens

    @classmethod
    def open(cls, run_or_dir: RunDir | str | Path) -> "TokenStore":
        directory = _store_dir(run_or_dir)
        return cls(directory, *read_tokens(directory, _remedy(directory)))

    @functools.cached_property
    def index(self) -> pa.Table:
        """One row per document in ingest order (at 100 M documents, gigabytes: hence read only when asked)."""
        index_path = self.directory / "index.parquet"
        try:
            index = pq.read_table(index_path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise FramelmError(f"{index_path}: cannot read the token store's index ({exc!r}); {_remedy(self.directory)}") from None
        if index.num_rows != self.meta.get("n_docs"):
            raise FramelmError(f"{index_path}: {index.num_rows} rows but meta.json says {self.meta.get('n_docs')} documents")
        return index

    @functools.cached_property
    def _spans(self) -> tuple[np.ndarray, np.ndarray]:
        return self.index.column("offset").to_numpy(), self.index.column("n_tokens").to_numpy()

    @functools.cached_property
    def _row_of_id(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.index.column("id").to_pylist())}

    def __len__(self) -> int:
        return self.index.num_rows

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_dir(self) -> Path:
        """The copy of the tokenizer that made these tokens."""
        return self.directory / "tokenizer"

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document `i` (ingest order), without its EOS."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range: the store has {len(self)} documents")
        offsets, lengths = self._spans
        start = int(offsets[i])
        return self.tokens[start: start + int(lengths[i])]

    def doc_by_id(self, doc_id: str) -> np.ndarray:
        row = self._row_of_id.get(doc_id)
        if row is None:
            raise FramelmError(f"document id {doc_id!r} is not in the token store {self.directory}")
        return self.doc(row)


def read_tokens(directory: Path, remedy: str) -> tuple[dict[str, Any], np.ndarray]:
    """meta.json of a token folder and its tokens.bin as a read-only memmap, checked to agree. A
    missing, malformed or disagreeing file raises a FramelmError naming it, followed by `remedy`."""
    meta_path = directory / "meta.json"
    meta = fsutil.read_json(meta_path, remedy)
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise FramelmError(f"{meta_path}: 'dtype' = {meta.get('dtype')!r}; expected one of {', '.join(TOKEN_DTYPES)}; {remedy}")
    for key in META_INT_KEYS:
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FramelmError(f"{meta_path}: '{key}' = {value!r}; expected a non-negative integer; {remedy}")
    dtype, n_tokens = np.dtype(meta["dtype"]), meta["n_tokens"]
    tokens_path = directory / "tokens.bin"
    size = tokens_path.stat().st_size if tokens_path.is_file() else -1
    if size != n_tokens * dtype.itemsize:
        raise FramelmError(f"{tokens_path}: {meta_path.name} says n_tokens = {n_tokens} {dtype.name} tokens "
                           f"({n_tokens * dtype.itemsize} bytes), found {'no file' if size < 0 else f'{size} bytes'}; {remedy}")
    # numpy cannot map an empty file
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.empty(0, dtype)
    return meta, tokens


def _remedy(directory: Path) -> str:
    return f"re-run framelm tokenize --run-dir {directory.parent} --force"


def _store_dir(run_or_dir: RunDir | str | Path) -> Path:
    if isinstance(run_or_dir, RunDir):
        directory = run_or_dir.path("tokenize")
        if not (directory / "meta.json").is_file():
            raise FramelmError(f"no token store at {directory}; run framelm tokenize --run-dir {run_or_dir.root} first")
        return directory
    path = Path(run_or_dir).expanduser()
    for candidate in (path, path / "tokenize"):
        if (candidate / "meta.json").is_file():
            return candidate
    raise FramelmError(f"no token store at {path}: expected meta.json there or in {path / 'tokenize'}; "
                       f"run: framelm tokenize --run-dir RUN")
