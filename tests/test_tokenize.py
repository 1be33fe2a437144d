import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from framelm.errors import FramelmError
from framelm.ingest import IngestConfig
from framelm.pipeline import run_stage, upstream_keys
from framelm.rundir import RunDir
from framelm.tokenize import TokenizeConfig, choose_dtype
from framelm.tokenizer import TokenizerTrainConfig, load_tokenizer
from framelm.tokenstore import TokenStore

WORDS = "the of and to in is was for on that with as by it at from token store memmap shard worker".split()


def write_corpus(path: Path, n_docs: int) -> Path:
    rng = random.Random(1)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 80))]
            if i % 5 == 0:
                words.append(rng.choice(["Ünïcödé", "中文", "🚀🚀", "\n\n  indented"]))
            fh.write(json.dumps({"id": f"d{i}", "text": " ".join(words)}) + "\n")
    return path


def prepared_run(root: Path, corpus: Path, docs_per_shard: int = 4096) -> RunDir:
    """A run directory with ingest and a trained tokenizer."""
    run = RunDir(root)
    run_stage("ingest", IngestConfig(inputs=[str(corpus)], docs_per_shard=docs_per_shard), run)
    run_stage("tokenizer", TokenizerTrainConfig(vocab_size=300, min_frequency=1), run)
    return run


def ingested_texts(run: RunDir) -> list[str]:
    parts = sorted(run.path("ingest", "documents").glob("part-*.parquet"))
    return [t for p in parts for t in pq.read_table(p, columns=["text"])["text"].to_pylist()]


def one_at_a_time(tokenizer_path: Path, texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """The expected token stream, built independently: encode each document alone, append EOS."""
    tok, eos = load_tokenizer(tokenizer_path)
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    return np.array([i for doc in ids for i in doc + [eos]], dtype=np.int64), [len(d) for d in ids]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl", 300)


def test_tokens_match_an_independent_encoding(corpus, tmp_path):
    # small shards: several work units, so the two worker processes both get work
    run = prepared_run(tmp_path / "run", corpus, docs_per_shard=40)
    counts = run_stage("tokenize", TokenizeConfig(num_workers=2, batch_docs=16), run)
    texts = ingested_texts(run)
    expected, lengths = one_at_a_time(run.path("tokenizer"), texts)

    store = TokenStore.open(run)
    assert store.tokens.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(store.tokens, dtype=np.int64), expected)
    assert counts["docs"] == len(texts) == len(store) == store.meta["n_docs"]
    assert counts["tokens"] == expected.size == store.meta["n_tokens"]
    assert store.index["n_tokens"].to_pylist() == lengths
    assert store.index["offset"].to_pylist() == list(np.cumsum([0] + [n + 1 for n in lengths])[:-1])
    ingest_ids = [i for p in sorted(run.path("ingest", "documents").glob("*.parquet")) for i in pq.read_table(p)["id"].to_pylist()]
    assert store.index["id"].to_pylist() == ingest_ids
    assert store.meta == {"dtype": "uint16", "vocab_size": 300, "eos_id": store.eos_id, "n_docs": len(texts),
                          "n_tokens": expected.size, "tokenizer": "tokenize/tokenizer"}
    tok, _ = load_tokenizer(store.tokenizer_dir)
    assert tok.decode(store.doc(7).tolist()) == texts[7]
    np.testing.assert_array_equal(store.doc_by_id("d7"), store.doc(7))
    assert all(store.tokens[o + n] == store.eos_id for o, n in zip(store.index["offset"].to_pylist(), lengths))
    written = sorted(str(p.relative_to(run.path("tokenize"))) for p in run.path("tokenize").rglob("*") if p.is_file())
    assert written == [".framelm-hash", "index.parquet", "meta.json", "tokenizer/special_tokens_map.json",
                       "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokens.bin"]
    assert set(upstream_keys("tokenize", TokenizeConfig())) == {"ingest", "tokenizer"}

    # re-running with the same config does no work
    mtime = run.path("tokenize", "tokens.bin").stat().st_mtime_ns
    assert run_stage("tokenize", TokenizeConfig(num_workers=1), run) == counts
    assert run.path("tokenize", "tokens.bin").stat().st_mtime_ns == mtime


def test_external_tokenizer_file_and_uint16_refusal(corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    run = RunDir(tmp_path / "run")
    run_stage("ingest", IngestConfig(inputs=[str(corpus)]), run)
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70_000)})
    vocab.update({"[UNK]": len(vocab), "</s>": len(vocab) + 1})
    big = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))

    cfg = TokenizeConfig(tokenizer=str(tmp_path / "big.json"), dtype="uint16", num_workers=1)
    assert upstream_keys("tokenize", cfg) == ("ingest",)
    with pytest.raises(FramelmError, match=f"uint16 cannot hold this tokenizer's {len(vocab)} token ids"):
        run_stage("tokenize", cfg, run)

    counts = run_stage("tokenize", TokenizeConfig(tokenizer=str(tmp_path / "big.json"), num_workers=1), run)
    store = TokenStore.open(run.root)
    assert counts["dtype"] == "uint32" and store.tokens.dtype == np.uint32
    expected, _ = one_at_a_time(tmp_path / "big.json", ingested_texts(run))
    np.testing.assert_array_equal(np.asarray(store.tokens, dtype=np.int64), expected)
    assert store.eos_id == vocab["</s>"]
    assert load_tokenizer(store.tokenizer_dir)[1] == vocab["</s>"]  # the copy is a loadable HF dir

    # the same path with other content is another tokenizer: the stage runs again
    small = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]"))
    small.pre_tokenizer = pre_tokenizers.Whitespace()
    small.save(str(tmp_path / "big.json"))
    counts = run_stage("tokenize", TokenizeConfig(tokenizer=str(tmp_path / "big.json"), num_workers=1), run)
    assert counts["dtype"] == "uint16" and TokenStore.open(run).eos_id == 1


def test_choose_dtype():
    assert choose_dtype("auto", 65536) == np.uint16
    assert choose_dtype("auto", 65537) == np.uint32
    assert choose_dtype("uint32", 10) == np.uint32
    with pytest.raises(FramelmError, match="uint16 cannot hold"):
        choose_dtype("uint16", 65537)


def test_missing_tokenizer_and_store(tmp_path, corpus):
    run = RunDir(tmp_path / "run")
    run_stage("ingest", IngestConfig(inputs=[str(corpus)]), run)
    with pytest.raises(FramelmError, match="stage 'tokenizer' has not finished"):
        run_stage("tokenize", TokenizeConfig(), run)
    with pytest.raises(FramelmError, match="no tokenizer at"):
        run_stage("tokenize", TokenizeConfig(tokenizer=str(tmp_path / "nope")), run)
    with pytest.raises(FramelmError, match="no token store"):
        TokenStore.open(run)


def test_resume_after_sigkill_gives_identical_files(corpus, tmp_path):
    clean = prepared_run(tmp_path / "clean", corpus, docs_per_shard=10)
    shutil.copytree(clean.root, tmp_path / "killed")
    killed = RunDir(tmp_path / "killed")
    run_stage("tokenize", TokenizeConfig(num_workers=1), clean)

    cmd = [sys.executable, "-m", "framelm", "tokenize", "--run-dir", str(killed.root), "--num-workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = killed.path("tokenize", "shards")
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and len(list(shards.glob("*.done"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(shards.glob("*.done")))
    assert 0 < finished < 30, "the subprocess was not killed mid-run"
    assert not killed.path("tokenize", "meta.json").exists()

    run_stage("tokenize", TokenizeConfig(num_workers=1), killed)
    for name in ("tokens.bin", "index.parquet", "meta.json", "tokenizer/tokenizer.json"):
        assert killed.path("tokenize", name).read_bytes() == clean.path("tokenize", name).read_bytes(), name


def test_config_validation():
    from framelm.errors import ConfigError

    with pytest.raises(ConfigError, match="num_workers"):
        TokenizeConfig.from_dict({"num_workers": 0})
    with pytest.raises(ConfigError, match="dtype"):
        TokenizeConfig.from_dict({"dtype": "int8"})


def _word_tokenizer(folder: Path, vocab: dict[str, int], eos: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([t for t in vocab if t.startswith("<")])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return folder


def _ingested(tmp_path: Path, texts: list[str]) -> RunDir:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    run = RunDir(tmp_path / "run")
    run_stage("ingest", IngestConfig(inputs=[str(corpus)], heldout_fraction=0, ref_fraction=0), run)
    return run


def test_the_eos_text_inside_a_document_is_not_an_eos_token(tmp_path):
    texts = [f"plain text number {i} about tokenizers" for i in range(40)]
    run = _ingested(tmp_path, texts + ["documents are separated by <|endoftext|> in GPT-2"])
    run_stage("tokenizer", TokenizerTrainConfig(vocab_size=300, min_frequency=1), run)
    run_stage("tokenize", TokenizeConfig(num_workers=1), run)
    store = TokenStore.open(run)
    assert int((store.tokens == store.eos_id).sum()) == len(texts) + 1, "one EOS per document, none inside one"


def test_editing_the_tokenizer_config_reruns_tokenize(tmp_path):
    tok_dir = _word_tokenizer(tmp_path / "tok", {"[UNK]": 0, "a": 1, "<s1>": 2, "<s2>": 3}, "<s1>")
    run = _ingested(tmp_path, ["a a a"])
    run_stage("tokenize", TokenizeConfig(tokenizer=str(tok_dir), num_workers=1), run)
    assert TokenStore.open(run).tokens.tolist() == [1, 1, 1, 2]
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s2>"}))
    run_stage("tokenize", TokenizeConfig(tokenizer=str(tok_dir), num_workers=1), run)
    assert TokenStore.open(run).tokens.tolist() == [1, 1, 1, 3]


def test_vocab_size_covers_the_largest_token_id(tmp_path):
    tok_dir = _word_tokenizer(tmp_path / "tok", {"[UNK]": 0, "a": 1, "b": 70000, "<eos>": 2}, "<eos>")
    run = _ingested(tmp_path, ["a b"])
    counts = run_stage("tokenize", TokenizeConfig(tokenizer=str(tok_dir), num_workers=1), run)
    assert counts["vocab_size"] == 70001 and counts["dtype"] == "uint32"
    assert TokenStore.open(run).tokens.tolist() == [1, 70000, 2]
