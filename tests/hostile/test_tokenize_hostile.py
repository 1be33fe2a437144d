"""Hostile input to `framelm tokenize`: a vocabulary too large for a forced uint16, a single
50 MB document, NUL bytes and odd Unicode; plus broken tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from .conftest import assert_nothing_half_written, assert_user_error, write_jsonl

EOS = "<|endoftext|>"


def word_level_tokenizer(path: Path, n_words: int) -> Path:
    """A whitespace word-level tokenizer with ids 0..n_words-1 for w0..w{n-1}, then EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n_words)}
    vocab["[UNK]"] = n_words
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def byte_bpe_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def ingest(framelm_cli, run: Path, records: list) -> None:
    src = write_jsonl(run.parent / f"{run.name}-input.jsonl", records)
    result = framelm_cli("ingest", "--run-dir", run, "--quiet", "--inputs", src, "--heldout-fraction", "0", "--ref-fraction", "0")
    assert result.code == 0, result.err


def test_uint16_forced_on_a_vocabulary_that_does_not_fit(framelm_cli, tmp_path):
    big = 70_000
    tok_dir = word_level_tokenizer(tmp_path / "big-tok", big)
    run = tmp_path / "run"
    ingest(framelm_cli, run, [{"id": "a", "text": f"w1 w{big - 1} w65536 w65535"}])
    result = framelm_cli("tokenize", "--run-dir", run, "--quiet", "--tokenizer", tok_dir, "--dtype", "uint16", "--num-workers", "1")
    assert_user_error(result, "dtype uint16 cannot hold", f"{big + 2} token ids", "--dtype uint32")
    assert_nothing_half_written(run, "tokenize")
    assert not (run / "tokenize" / "tokens.bin").exists()

    # auto picks uint32 and keeps ids above 65535 exact
    result = framelm_cli("tokenize", "--run-dir", run, "--quiet", "--tokenizer", tok_dir, "--num-workers", "1")
    assert result.code == 0, result.err
    meta = json.loads((run / "tokenize" / "meta.json").read_text())
    assert meta["dtype"] == "uint32"
    tokens = np.fromfile(run / "tokenize" / "tokens.bin", dtype=np.uint32)
    assert tokens.tolist() == [1, big - 1, 65536, 65535, meta["eos_id"]]


def test_nul_bytes_and_odd_unicode_survive_tokenize(framelm_cli, tmp_path):
    from tokenizers import Tokenizer

    tok_dir = byte_bpe_tokenizer(tmp_path / "tok")
    texts = ["nul\x00byte", "emoji \U0001F600 and combining e\u0301", "bidi \u202e override \u2028 line sep", "\ufeffbom first"]
    run = tmp_path / "run"
    ingest(framelm_cli, run, [{"id": str(i), "text": t} for i, t in enumerate(texts)])
    result = framelm_cli("tokenize", "--run-dir", run, "--quiet", "--tokenizer", tok_dir, "--num-workers", "1")
    assert result.code == 0, result.err
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tokens = np.fromfile(run / "tokenize" / "tokens.bin", dtype=np.uint16)
    index = pq.read_table(run / "tokenize" / "index.parquet").to_pylist()
    decoded = [tok.decode(tokens[r["offset"]: r["offset"] + r["n_tokens"]].tolist()) for r in index]
    assert decoded == texts


@pytest.mark.slow
def test_one_50_megabyte_document(framelm_cli, tmp_path):
    """One huge document (50 MB, far above a Parquet row group's byte budget) goes through
    ingest and tokenize intact."""
    tok_dir = word_level_tokenizer(tmp_path / "tok", 10)
    text = ("w1 w2 w3 w4 w5 w6 w7 w8 w9 w0 " * (50 * 2**20 // 30 + 1))[: 50 * 2**20 - 1] + "\n"
    run = tmp_path / "run"
    ingest(framelm_cli, run, [{"id": "huge", "text": text}, {"id": "small", "text": "w7 w8"}])
    docs = pq.read_table(run / "ingest" / "documents" / "part-00000.parquet").to_pylist()
    assert [d["n_bytes"] for d in docs] == [50 * 2**20, 5] and docs[0]["text"] == text
    result = framelm_cli("tokenize", "--run-dir", run, "--quiet", "--tokenizer", tok_dir, "--num-workers", "1")
    assert result.code == 0, result.err
    meta = json.loads((run / "tokenize" / "meta.json").read_text())
    index = pq.read_table(run / "tokenize" / "index.parquet").to_pylist()
    assert [r["n_tokens"] for r in index] == [len(text.split()), 2]
    assert [r["offset"] for r in index] == [0, index[0]["n_tokens"] + 1]
    tokens = np.memmap(run / "tokenize" / "tokens.bin", dtype=np.uint16, mode="r")
    assert tokens.size == meta["n_tokens"] == index[0]["n_tokens"] + 4
    assert tokens[index[0]["n_tokens"]] == meta["eos_id"] and tokens[-3:].tolist() == [7, 8, meta["eos_id"]]


def test_broken_tokenizer_files(framelm_cli, tmp_path):
    run = tmp_path / "run"
    ingest(framelm_cli, run, [{"id": "a", "text": "some text"}])
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    assert_user_error(framelm_cli("tokenize", "--run-dir", run, "--quiet", "--tokenizer", garbage),
                      str(garbage / "tokenizer.json"), "not a valid tokenizers JSON file")
    no_eos = word_level_tokenizer(tmp_path / "no-eos", 10)
    (no_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</missing>"}))
    data = json.loads((no_eos / "tokenizer.json").read_text())
    data["added_tokens"] = []
    (no_eos / "tokenizer.json").write_text(json.dumps(data))
    assert_user_error(framelm_cli("tokenize", "--run-dir", run, "--quiet", "--tokenizer", no_eos), "has no EOS token")
    assert_user_error(framelm_cli("tokenize", "--run-dir", run, "--quiet", "--tokenizer", tmp_path / "absent"),
                      "no tokenizer at", str(tmp_path / "absent"))
    assert_nothing_half_written(run, "tokenize")
