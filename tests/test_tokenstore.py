import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.errors import FramelmError
from framelm.tokenstore import TokenStore


def _store(directory, n_tokens=3, meta=None):
    directory.mkdir(parents=True)
    np.array([5, 7, 0][:n_tokens], np.uint16).tofile(directory / "tokens.bin")
    (directory / "meta.json").write_text(json.dumps(meta or {"dtype": "uint16", "n_tokens": n_tokens, "n_docs": 1, "eos_id": 0}))
    pq.write_table(pa.table({"id": ["a"], "offset": [0], "n_tokens": [n_tokens - 1]}), directory / "index.parquet")
    return directory


def test_open_reads_documents(tmp_path):
    store = TokenStore.open(_store(tmp_path / "tokenize"))
    assert store.doc(0).tolist() == [5, 7] and store.doc_by_id("a").tolist() == [5, 7] and store.eos_id == 0


def test_a_missing_index_or_bad_meta_is_named(tmp_path):
    directory = _store(tmp_path / "tokenize")
    (directory / "index.parquet").unlink()
    with pytest.raises(FramelmError, match=f"{directory / 'index.parquet'}: cannot read the token store's index"):
        TokenStore.open(directory)
    bad = _store(tmp_path / "bad", meta={"dtype": "uint16", "n_tokens": "three", "n_docs": 1, "eos_id": 0})
    with pytest.raises(FramelmError, match=f"{bad / 'meta.json'}: not a framelm token store meta file"):
        TokenStore.open(bad)
