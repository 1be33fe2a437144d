import json
import random
from pathlib import Path

import pytest

from framelm.errors import FramelmError
from framelm.ingest import IngestConfig
from framelm.pipeline import run_stage
from framelm.rundir import RunDir
from framelm.tokenizer import EOS_TOKEN, TokenizerTrainConfig, document_parts, load_tokenizer, select_sample

WORDS = "the of and to in is was for on that with as by it at from language model data curriculum perplexity".split()


def synthetic_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
            words.insert(rng.randrange(len(words)), rng.choice(["naïve", "日本語", "🙂", "x=1;"]))
            fh.write(json.dumps({"id": f"doc{i}", "text": " ".join(words)}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> RunDir:
    tmp = tmp_path_factory.mktemp("tok")
    run = RunDir(tmp / "run")
    run_stage("ingest", IngestConfig(inputs=[str(synthetic_corpus(tmp / "c.jsonl", 400))]), run)
    run_stage("tokenizer", TokenizerTrainConfig(vocab_size=320, min_frequency=1), run)
    return run


def test_trained_tokenizer_loads_with_transformers(trained_run):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = trained_run.path("tokenizer")
    for hf in (AutoTokenizer.from_pretrained(path), PreTrainedTokenizerFast.from_pretrained(path)):
        assert hf.eos_token == EOS_TOKEN and hf.bos_token == EOS_TOKEN
        text = "the naïve model 日本語 🙂"
        ids = hf(text)["input_ids"]
        assert hf.eos_token_id not in ids  # no special tokens added around text
        assert hf.decode(ids) == text
    rec = trained_run.record("tokenizer")
    assert rec["counts"]["vocab_size"] == 320
    assert rec["counts"]["eos_id"] == hf.eos_token_id


def test_training_is_deterministic(trained_run, tmp_path):
    run = RunDir(tmp_path / "again")
    ingest_cfg = IngestConfig.from_dict(trained_run.record("ingest")["config"])
    run_stage("ingest", ingest_cfg, run)
    run_stage("tokenizer", TokenizerTrainConfig(vocab_size=320, min_frequency=1), run)
    assert run.path("tokenizer", "tokenizer.json").read_bytes() == trained_run.path("tokenizer", "tokenizer.json").read_bytes()


def test_sample_takes_train_split_only_up_to_the_cap(trained_run):
    import pyarrow.parquet as pq

    parts = document_parts(trained_run)
    table = pq.read_table(parts[0])
    split = dict(zip(table["id"].to_pylist(), table["split"].to_pylist()))
    chosen, total = select_sample(parts, 2000, seed=0)
    assert chosen and all(split[i] == "train" for i in chosen)
    n_bytes = dict(zip(table["id"].to_pylist(), table["n_bytes"].to_pylist()))
    assert total == sum(n_bytes[i] for i in chosen) and total - max(n_bytes[i] for i in chosen) < 2000
    assert select_sample(parts, 2000, seed=0) == (chosen, total)
    assert select_sample(parts, 2000, seed=1)[0] != chosen
    everything, _ = select_sample(parts, 10**9, seed=0)
    assert everything == {i for i, s in split.items() if s == "train"}


def test_load_tokenizer_dir_file_and_eos(trained_run, tmp_path):
    tok, eos = load_tokenizer(trained_run.path("tokenizer"))
    assert tok.id_to_token(eos) == EOS_TOKEN
    assert load_tokenizer(trained_run.path("tokenizer", "tokenizer.json"))[1] == eos

    from tokenizers import Tokenizer, models, pre_tokenizers

    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.save(str(tmp_path / "noeos.json"))
    with pytest.raises(FramelmError, match="has no EOS token"):
        load_tokenizer(tmp_path / "noeos.json")

    custom = tmp_path / "custom"
    custom.mkdir()
    wl = Tokenizer(models.WordLevel({"a": 0, "[END]": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    wl.save(str(custom / "tokenizer.json"))
    assert load_tokenizer(custom)[1] == 2  # a known EOS spelling
    (custom / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[END]"}}))
    assert load_tokenizer(custom)[1] == 1  # the configured one wins

    with pytest.raises(FramelmError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(FramelmError, match="not a valid tokenizers JSON"):
        load_tokenizer(tmp_path / "broken.json")


def test_config_validation():
    from framelm.errors import ConfigError

    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerTrainConfig.from_dict({"vocab_size": 100})
    with pytest.raises(ConfigError, match="min_frequency"):
        TokenizerTrainConfig.from_dict({"min_frequency": 0})
