"""Read access to the token store written by `framelm tokenize`.

    store = TokenStore.open(run)          # a RunDir, a run directory path or RUN/tokenize
    store.tokens                          # np.memmap of every token (EOS after each document)
    store.index                           # pyarrow Table: id, source, split, offset, n_tokens, n_bytes
    store.doc(i), store.doc_by_id("x")    # one document's tokens, EOS not included

Reads: RUN/tokenize/meta.json, tokens.bin, index.parquet. Writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from framelm.errors import FramelmError
from framelm.rundir import RunDir


class TokenStore:
    """A finished token store: memory-mapped tokens, the document index and meta.json."""

    def __init__(self, directory: Path, meta: dict[str, Any], tokens: np.ndarray, index: pa.Table):
        self.directory = directory
        self.meta = meta
        self.tokens = tokens
        self.index = index
        self._offsets = index.column("offset").to_numpy()
        self._lengths = index.column("n_tokens").to_numpy()
        self._row_of_id: dict[str, int] | None = None

    @classmethod
    def open(cls, run_or_dir: RunDir | str | Path) -> "TokenStore":
        directory = _store_dir(run_or_dir)
        meta, tokens = read_tokens(directory)
        index_path = directory / "index.parquet"
        try:
            index = pq.read_table(index_path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise FramelmError(f"{index_path}: cannot read the token store's index ({exc!r}); re-run framelm tokenize --force") from None
        if index.num_rows != meta.get("n_docs"):
            raise FramelmError(f"{index_path}: {index.num_rows} rows but meta.json says {meta.get('n_docs')} documents")
        return cls(directory, meta, tokens, index)

    def __len__(self) -> int:
        return self.index.num_rows

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def tokenizer_dir(self) -> Path:
        """The copy of the tokenizer that made these tokens."""
        return self.directory / "tokenizer"

    def doc(self, i: int) -> np.ndarray:
        """Tokens of document `i` (ingest order), without its EOS."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range: the store has {len(self)} documents")
        start = int(self._offsets[i])
        return self.tokens[start: start + int(self._lengths[i])]

    def doc_by_id(self, doc_id: str) -> np.ndarray:
        if self._row_of_id is None:
            self._row_of_id = {d: i for i, d in enumerate(self.index.column("id").to_pylist())}
        row = self._row_of_id.get(doc_id)
        if row is None:
            raise FramelmError(f"document id {doc_id!r} is not in the token store {self.directory}")
        return self.doc(row)


def read_tokens(directory: Path) -> tuple[dict[str, Any], np.ndarray]:
    """meta.json of a token store folder and its tokens.bin as a read-only memmap, checked to agree."""
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        n_tokens = int(meta["n_tokens"])
    except (OSError, KeyError, TypeError, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise FramelmError(f"{meta_path}: not a framelm token store meta file ({exc!r}); re-run framelm tokenize") from None
    tokens_path = directory / "tokens.bin"
    size = tokens_path.stat().st_size if tokens_path.exists() else -1
    if size != n_tokens * dtype.itemsize:
        raise FramelmError(f"{tokens_path}: expected {n_tokens} {dtype.name} tokens ({n_tokens * dtype.itemsize} bytes), "
                           f"found {'no file' if size < 0 else f'{size} bytes'}; re-run framelm tokenize --force")
    # numpy cannot map an empty file
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.empty(0, dtype)
    return meta, tokens


def _store_dir(run_or_dir: RunDir | str | Path) -> Path:
    if isinstance(run_or_dir, RunDir):
        run_or_dir = run_or_dir.path("tokenize")
    path = Path(run_or_dir).expanduser()
    for candidate in (path, path / "tokenize"):
        if (candidate / "meta.json").is_file():
            return candidate
    raise FramelmError(f"no token store at {path}: expected meta.json there or in {path / 'tokenize'}; "
                       f"run: framelm tokenize --run-dir RUN")
