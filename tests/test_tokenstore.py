import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.errors import FramelmError
from framelm.tokenstore import StageRange, TokenStore, check_stages, read_tokens


def _store(directory, n_tokens=3, meta=None):
    directory.mkdir(parents=True)
    np.array([5, 7, 0][:n_tokens], np.uint16).tofile(directory / "tokens.bin")
    (directory / "meta.json").write_text(json.dumps(meta or {"dtype": "uint16", "n_tokens": n_tokens, "n_docs": 1, "eos_id": 0, "vocab_size": 8}))
    pq.write_table(pa.table({"id": ["a"], "offset": [0], "n_tokens": [n_tokens - 1]}), directory / "index.parquet")
    return directory


def test_open_reads_documents(tmp_path):
    store = TokenStore.open(_store(tmp_path / "tokenize"))
    assert store.doc(0).tolist() == [5, 7] and store.doc_by_id("a").tolist() == [5, 7] and store.eos_id == 0


def test_a_missing_index_or_bad_meta_is_named(tmp_path):
    directory = _store(tmp_path / "tokenize")
    (directory / "index.parquet").unlink()
    with pytest.raises(FramelmError, match=f"{directory / 'index.parquet'}: cannot read the token store's index"):
        TokenStore.open(directory).index
    bad = _store(tmp_path / "bad", meta={"dtype": "uint16", "n_tokens": "three", "n_docs": 1, "eos_id": 0, "vocab_size": 8})
    with pytest.raises(FramelmError, match=f"{bad / 'meta.json'}: 'n_tokens' = 'three'; expected a non-negative integer"):
        TokenStore.open(bad)


@pytest.mark.parametrize("change, message", [
    ({"dtype": "int64"}, "'dtype' = 'int64'; expected one of uint16, uint32"),
    ({"eos_id": True}, "'eos_id' = True; expected a non-negative integer"),
    ({"vocab_size": None}, "'vocab_size' = None; expected a non-negative integer"),
    ({"n_tokens": 4}, "tokens.bin: meta.json says n_tokens = 4 uint16 tokens \\(8 bytes\\), found 6 bytes"),
])
def test_read_tokens_names_the_bad_field_and_the_remedy(tmp_path, change, message):
    meta = {"dtype": "uint16", "n_tokens": 3, "n_docs": 1, "eos_id": 0, "vocab_size": 8}
    directory = _store(tmp_path / "tokenize", meta={**meta, **change})
    with pytest.raises(FramelmError, match=f"{message}; do this"):
        read_tokens(directory, "do this")


def test_stages_must_tile_the_stream():
    check_stages([StageRange("a", 0, 400), StageRange("b", 400, 1000)], 1000, "meta.json")
    with pytest.raises(FramelmError, match=r"meta.json: stages\[1\] \(b\) spans \[401, 1000\) but should start at token 400"):
        check_stages([StageRange("a", 0, 400), StageRange("b", 401, 1000)], 1000, "meta.json")
    with pytest.raises(FramelmError, match="stages end at token 1000 but the stream has 1001"):
        check_stages([StageRange("a", 0, 400), StageRange("b", 400, 1000)], 1001, "meta.json")


def test_the_index_is_read_only_when_asked_for(tmp_path):
    directory = _store(tmp_path / "tokenize")
    (directory / "index.parquet").write_bytes(b"not parquet")
    store = TokenStore.open(directory)  # what the export needs: the tokens and meta.json
    assert store.tokens.tolist() == [5, 7, 0] and (store.dtype, store.eos_id, store.vocab_size) == ("uint16", 0, 8)
    with pytest.raises(FramelmError, match="index.parquet: cannot read the token store's index"):
        store.doc(0)
