"""Tiny real fixtures for the score stage: BPE tokenizers, random Llama models, a run directory."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.rundir import RunDir

CONTEXT = 32  # window used by the tests; the long document below needs several windows

TEXTS = [
    "The cat sat on the mat and looked at the dog.",
    "Numbers: 3 + 4 = 7, and 12 * 12 = 144.",
    "",  # tokenizes to nothing: status "empty"
    "a",
    "In the beginning the universe was created. This has made a lot of people very angry. " * 4,
    "From: someone@example.com\nSubject: Re: hello\n\n> quoted text\nreply here.",
    "Short.",
    "Tokens, tokens everywhere, and not a drop to drink.",
    "Mixed CASE words And Punctuation!!! ???",
    "One more document about cats and dogs and mats.",
]


def _tokenizer(path: Path, vocab_size: int, bos: str | None, eos: str | None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [s for s in (bos, eos) if s]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t for t in TEXTS if t] * 3, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos).save_pretrained(path)
    return path


def make_model(path: Path, seed: int, vocab_size: int, bos: str | None, eos: str | None, layers: int = 2) -> Path:
    """A random LlamaForCausalLM with its own tokenizer, saved as a local HF dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _tokenizer(path, vocab_size, bos, eos)
    n_vocab = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ref_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refmodels")
    return {
        # Different tokenizers: the weak one has a BOS token, the strong one only an EOS.
        "weak": make_model(root / "weak", seed=1, vocab_size=300, bos="<s>", eos="</s>", layers=1),
        "strong": make_model(root / "strong", seed=2, vocab_size=400, bos=None, eos="<|endoftext|>"),
    }


def make_run(root: Path, models: dict[str, Path], texts: list[str] = TEXTS, files: int = 2) -> RunDir:
    """A run dir with ingest documents, a tokenize index and reference models, as ARCHITECTURE.md says."""
    import shutil

    run = RunDir(root)
    ids = [f"doc-{i:03d}" for i in range(len(texts))]
    table = pa.table({
        "id": ids,
        "source": ["web" if i % 2 else "books" for i in range(len(texts))],
        "split": ["train", "heldout", "ref"] * (len(texts) // 3) + ["train"] * (len(texts) % 3),
        "text": texts,
        "n_chars": pa.array([len(t) for t in texts], pa.int64()),
        "n_bytes": pa.array([len(t.encode()) for t in texts], pa.int64()),
    })
    per_file = -(-len(texts) // files)
    for f in range(files):
        out = run.path("ingest", "documents", f"part-{f:05d}.parquet")
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(f * per_file, per_file), out, row_group_size=3)
    index = pa.table({
        "id": ids[::-1],  # another order than ingest's: scores must join by id
        "source": table.column("source").to_pylist()[::-1],
        "split": table.column("split").to_pylist()[::-1],
        "offset": pa.array(range(len(texts)), pa.int64()),
        "n_tokens": pa.array([len(t) // 3 for t in texts][::-1], pa.int64()),
        "n_bytes": table.column("n_bytes").to_pylist()[::-1],
    })
    pq.write_table(index, run.stage_dir("tokenize") / "index.parquet")
    for name, src in models.items():
        shutil.copytree(src, run.path("refmodels", name))
    run.update_record("tokenize", {"status": "done", "hash": "tokenize-test"})
    run.update_record("refmodels", {"status": "done", "hash": "refmodels-test"})
    return run
