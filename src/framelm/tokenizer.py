"""`framelm tokenizer train`: a byte-level BPE tokenizer trained on the ingested corpus.

The training sample is deterministic: `train`-split documents ordered by a hash of their id
and `seed`, taken until `sample_bytes` is reached. `<|endoftext|>` is the only special token
and serves as EOS and BOS. Also `load_tokenizer`, which every stage uses to open a tokenizer.

Reads:  RUN/ingest/documents/part-*.parquet
Writes: RUN/tokenizer/tokenizer.json, tokenizer_config.json, special_tokens_map.json
        (a Hugging Face tokenizer directory: `AutoTokenizer.from_pretrained(RUN/tokenizer)`)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from framelm import fsutil
from framelm.config import StageConfig, field
from framelm.errors import ConfigError, FramelmError
from framelm.progress import progress_bar
from framelm.ingest import DOCUMENT_GLOB
from framelm.rundir import RunDir

log = logging.getLogger("framelm")

EOS_TOKEN = "<|endoftext|>"
# EOS spellings of common tokenizers, tried when a tokenizer's config names none
KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# what a Hugging Face tokenizer directory may hold besides TOKENIZER_FILES (copied with it; weights are not)
EXTRA_TOKENIZER_FILES = ("added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


@dataclasses.dataclass
class TokenizerTrainConfig(StageConfig):
    vocab_size: int = field(8192, help="vocabulary size in tokens, including the 256 byte tokens and <|endoftext|>")
    sample_bytes: int = field(100_000_000, help="UTF-8 bytes of training-split text the tokenizer is trained on: whole documents are taken until their bytes reach this, so the last one may pass it")
    min_frequency: int = field(2, help="minimum count of a pair for it to be merged")
    seed: int = field(0, help="seed of the hash that orders documents for the sample")

    def validate(self) -> None:
        if not 257 < self.vocab_size <= 1 << 20:
            raise ConfigError(f"'vocab_size' = {self.vocab_size} must be between 258 (256 bytes + EOS + one merge) and 1048576")
        if self.sample_bytes <= 0:
            raise ConfigError(f"'sample_bytes' = {self.sample_bytes} must be positive")
        if self.min_frequency < 1:
            raise ConfigError(f"'min_frequency' = {self.min_frequency} must be at least 1")


def document_parts(run: RunDir) -> list[Path]:
    """The ingested Parquet shards in order; an error if ingest has not run."""
    run.require("ingest")
    parts = sorted(run.path("ingest", "documents").glob(DOCUMENT_GLOB))
    if not parts:
        raise FramelmError(f"no documents in {run.path('ingest', 'documents')}; re-run: framelm ingest --run-dir {run.root}")
    return parts


def _sample_order_key(doc_id: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def select_sample(parts: list[Path], sample_bytes: int, seed: int) -> tuple[set[str], int]:
    """Ids of the training-split documents in the sample, and their total bytes."""
    candidates = []
    for part in parts:
        table = pq.read_table(part, columns=["id", "split", "n_bytes"])
        for doc_id, split, n_bytes in zip(*(table.column(c).to_pylist() for c in ("id", "split", "n_bytes"))):
            if split == "train":
                candidates.append((_sample_order_key(doc_id, seed), doc_id, n_bytes))
    candidates.sort()
    chosen: set[str] = set()
    total = 0
    for _, doc_id, n_bytes in candidates:
        if total >= sample_bytes:
            break
        chosen.add(doc_id)
        total += n_bytes
    return chosen, total


def _sample_texts(parts: list[Path], chosen: set[str]) -> Iterator[str]:
    """Texts of the chosen documents in ingest order (so the trainer sees a fixed sequence)."""
    for part in parts:
        pf = pq.ParquetFile(part)
        for batch in pf.iter_batches(columns=["id", "text"], batch_size=1024):
            for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if doc_id in chosen:
                    yield text


def new_bpe_tokenizer(vocab_size: int, min_frequency: int) -> tuple[Any, Any]:
    """An untrained byte-level BPE tokenizer and its trainer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    return tok, trainer


def save_hf_tokenizer(tok: Any, out_dir: Path) -> None:
    """Write `tok` as a Hugging Face tokenizer directory, each file atomically."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=None,
                                 model_max_length=int(1e30))
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save" + fsutil.TMP_TAG) as tmp:
        hf.save_pretrained(tmp)
        tmp_dir = Path(tmp)
        config = fsutil.read_json(tmp_dir / "tokenizer_config.json")
        # transformers 5 names its own backend class, which 4.x cannot load; this name loads in both
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        fsutil.write_json(tmp_dir / "tokenizer_config.json", config)
        if not (tmp_dir / "special_tokens_map.json").exists():  # transformers 5 folds it into tokenizer_config.json
            fsutil.write_json(tmp_dir / "special_tokens_map.json", {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN})
        for name in TOKENIZER_FILES:
            fsutil.write_bytes(out_dir / name, (tmp_dir / name).read_bytes())


def train_tokenizer(cfg: TokenizerTrainConfig, run: RunDir) -> dict[str, Any]:
    """Train on a sample of RUN/ingest and write RUN/tokenizer/; return the counts."""
    parts = document_parts(run)
    chosen, total_bytes = select_sample(parts, cfg.sample_bytes, cfg.seed)
    if not chosen:
        raise FramelmError(f"the ingested corpus in {run.root} has no 'train'-split documents to train a tokenizer on")
    tok, trainer = new_bpe_tokenizer(cfg.vocab_size, cfg.min_frequency)
    texts = progress_bar(_sample_texts(parts, chosen), total=len(chosen), desc="tokenizer sample", unit=" docs")
    tok.train_from_iterator(texts, trainer=trainer, length=len(chosen))
    out_dir = run.stage_dir("tokenizer")
    save_hf_tokenizer(tok, out_dir)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab < cfg.vocab_size:
        log.warning("tokenizer: the sample supports only %d of the %d requested tokens (too little text or min_frequency too high)",
                    vocab, cfg.vocab_size)
    return {"vocab_size": vocab, "sample_docs": len(chosen), "sample_bytes": total_bytes,
            "eos_id": tok.token_to_id(EOS_TOKEN)}


# -- loading -----------------------------------------------------------------------------

def _token_content(value: Any) -> str | None:
    """A special-token entry of a tokenizer config: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def tokenizer_json_path(path: str | Path) -> Path:
    """The tokenizer.json of a tokenizer directory or file path."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FramelmError(
            f"no tokenizer at {path}: expected a Hugging Face tokenizer directory with tokenizer.json, or a tokenizer.json "
            "file (slow-only tokenizers can be converted: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
    return file


def load_tokenizer(path: str | Path) -> tuple[Any, int]:
    """(tokenizers.Tokenizer, eos_id) from a tokenizer directory or a tokenizer.json file.

    EOS is the `eos_token` of tokenizer_config.json / special_tokens_map.json when present,
    else the first of the usual EOS spellings found among the added tokens.
    """
    from tokenizers import Tokenizer

    file = tokenizer_json_path(path)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise FramelmError(f"{file}: not a valid tokenizers JSON file ({exc})") from None
    candidates: list[str] = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg_file = file.parent / name
        if cfg_file.is_file():
            eos = _token_content(fsutil.read_json(cfg_file).get("eos_token"))
            if eos:
                candidates.append(eos)
    candidates.extend(KNOWN_EOS_TOKENS)
    for token in candidates:
        eos_id = tok.token_to_id(token)
        if eos_id is not None:
            return tok, eos_id
    raise FramelmError(
        f"tokenizer {file} has no EOS token: none of {', '.join(dict.fromkeys(candidates))} is in its vocabulary; "
        "set eos_token in tokenizer_config.json or train one with: framelm tokenizer train --run-dir RUN")


def copy_tokenizer(path: str | Path, out_dir: Path) -> None:
    """Copy the tokenizer at `path` (directory or tokenizer.json) into `out_dir` as an HF directory.

    A bare tokenizer.json gets a tokenizer_config.json naming its EOS, so the copy loads with
    `AutoTokenizer.from_pretrained(out_dir)` and `load_tokenizer(out_dir)` finds the same EOS.
    """
    tok, eos_id = load_tokenizer(path)
    src = tokenizer_json_path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in TOKENIZER_FILES + EXTRA_TOKENIZER_FILES if (src.parent / n).is_file()] if Path(path).expanduser().is_dir() else []
    for name in names or ["tokenizer.json"]:
        fsutil.write_bytes(out_dir / name, (src.parent / name if names else src).read_bytes())
    eos = tok.id_to_token(eos_id)
    if not (out_dir / "tokenizer_config.json").exists():
        fsutil.write_json(out_dir / "tokenizer_config.json",
                          {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": int(1e30)})
    if not (out_dir / "special_tokens_map.json").exists():
        fsutil.write_json(out_dir / "special_tokens_map.json", {"eos_token": eos})
