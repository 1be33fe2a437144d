"""The `refmodels` stage: train the weak and the strong reference models that score documents.

Reads RUN/tokenize/{tokens.bin, index.parquet, meta.json, tokenizer/} and writes

    RUN/refmodels/weak/, RUN/refmodels/strong/   Hugging Face model folders (config.json,
                                                 model.safetensors, tokenizer files)
    RUN/refmodels/train/{weak,strong}/           each model's log.jsonl and checkpoints/

Both models train with framelm's own trainer on the documents with split == "ref" (which no
curriculum trains on), concatenated with EOS after each, in a seeded random order per epoch so
that no source comes last; a budget larger than the ref split repeats it (a new order each
epoch). PD needs two models of different capability; the defaults make the weak model smaller
and trained on fewer tokens:

    weak   = preset "nano"  (~0.4 M non-embedding parameters), 10 k tokens
    strong = preset "micro" (~2.4 M non-embedding parameters), 20 k tokens

Measured on the built-in demo corpus (20 k ref tokens, vocabulary 8192): held-out loss 8.30
(weak) vs 7.70 (strong) nats/token. Longer budgets over-fit that small split (micro at 80 k
tokens, four epochs, ended at 7.83, worse than nano at 40 k with 7.67), so on a real corpus
raise the ref split, the budgets and the presets together. Both models are evaluated once on
the held-out sets (the counts record their losses), and the stage warns when the strong model
does not beat the weak one, because PD then measures noise. A killed run resumes from the
models' checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from framelm.config import ConfigError, StageConfig, field
from framelm.errors import FramelmError
from framelm.heldout import heldout_sets
from framelm.model import PRESETS, ModelConfig
from framelm.rundir import RunDir
from framelm.score import MODEL_NAMES
from framelm.tokenstore import StageRange, TokenStore
from framelm.train import TrainConfig, fit

log = logging.getLogger("framelm")


@dataclasses.dataclass
class RefModelsConfig(StageConfig):
    """Train a weak and a strong proxy on the corpus' "ref" split."""

    weak_preset: str = field("nano", help=f"model shape of the weak reference model: {', '.join(PRESETS)}")
    strong_preset: str = field("micro", help="model shape of the strong reference model")
    weak_tokens: int = field(10_000, help="training tokens of the weak model (the ref split repeats if smaller), "
                                           "rounded down to whole steps of seq_len x global_batch_seqs")
    strong_tokens: int = field(20_000, help="training tokens of the strong model (the ref split repeats if smaller), "
                                             "rounded down to whole steps")
    seq_len: int = field(128, help="tokens per training sequence")
    global_batch_seqs: int = field(8, help="sequences per optimizer step")
    lr: float = field(3e-3, help="peak learning rate (cosine schedule, 5 % warmup)")
    seed: int = field(0, help="seed of the document order and the weight initialisation")
    heldout_max_tokens_per_set: int = field(20_000, help="tokens per held-out set for the final evaluation")
    device: str = field("auto", hash=False, help="auto, cpu, cuda or cuda:N")

    def validate(self) -> None:
        for name in ("weak_preset", "strong_preset"):
            if getattr(self, name) not in PRESETS:
                raise ConfigError(f"'{name}' = {getattr(self, name)!r} is not a known model; choose one of: {', '.join(PRESETS)}")
        for name in ("weak_tokens", "strong_tokens"):
            if getattr(self, name) < self.seq_len * self.global_batch_seqs:
                raise ConfigError(f"'{name}' = {getattr(self, name)} is less than one step of seq_len x global_batch_seqs = "
                                  f"{self.seq_len * self.global_batch_seqs} tokens")
        for name in ("seq_len", "global_batch_seqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{name}' = {getattr(self, name)} must be at least 1")
        if self.heldout_max_tokens_per_set < 0:
            raise ConfigError(f"'heldout_max_tokens_per_set' = {self.heldout_max_tokens_per_set} must not be negative")
        if self.lr <= 0:
            raise ConfigError(f"'lr' = {self.lr} must be positive")

    def train_config(self, name: str) -> TrainConfig:
        """The trainer's config for model `name` ("weak" or "strong")."""
        step_tokens = self.seq_len * self.global_batch_seqs
        return TrainConfig(
            # max_seq_len = seq_len: the exported config's max_position_embeddings then says how far
            # the model was trained, which is the window `framelm score` reads by default.
            schedule="ref", seed=self.seed, model=ModelConfig(preset=getattr(self, f"{name}_preset"), max_seq_len=self.seq_len),
            seq_len=self.seq_len, global_batch_seqs=self.global_batch_seqs,
            max_tokens=getattr(self, f"{name}_tokens") // step_tokens * step_tokens, lr=self.lr,
            lr_schedule="cosine", eval_every_steps=0, checkpoint_every_steps=50,
            heldout_max_tokens_per_set=self.heldout_max_tokens_per_set, device=self.device,
        )


def ref_stream(run: RunDir, seed: int, min_tokens: int) -> tuple[np.ndarray, TokenStore]:
    """The ref documents' tokens, EOS after each, one seeded random order per epoch, repeated
    until the stream holds at least `min_tokens` tokens (0: one epoch); and the store they come from."""
    store = TokenStore.open(run)
    tokens = store.tokens
    index_path = run.path("tokenize", "index.parquet")
    index = pq.read_table(index_path, columns=["id", "split", "offset", "n_tokens"]).to_pandas()
    ref = index[index["split"] == "ref"]
    if ref.empty:
        raise FramelmError(f"{index_path} has no documents with split == 'ref'; "
                           f"ingest with a ref_fraction above 0 (framelm ingest --ref-fraction 0.05)")
    offsets, lengths = ref["offset"].to_numpy(), ref["n_tokens"].to_numpy()
    # A slice past the end of tokens.bin comes back short, not as an error: check each document
    # and the EOS that must follow it before the models train on a stream that is not the split.
    ends = offsets + lengths
    bad = np.flatnonzero((offsets < 0) | (lengths < 0) | (ends >= len(tokens)))
    if bad.size:
        i = bad[0]
        raise FramelmError(f"{index_path}: document {ref['id'].iat[i]!r} has offset {offsets[i]} + n_tokens {lengths[i]} "
                           f"(and its EOS) beyond tokens.bin ({len(tokens)} tokens); re-run tokenize")
    bad = np.flatnonzero(np.asarray(tokens[ends]) != store.eos_id)
    if bad.size:
        i = bad[0]
        raise FramelmError(f"{index_path}: document {ref['id'].iat[i]!r} (offset {offsets[i]}, n_tokens {lengths[i]}) is "
                           f"not followed by EOS {store.eos_id} in tokens.bin; index and token store disagree, re-run tokenize")
    epoch_tokens = int(lengths.sum()) + len(ref)
    epochs = max(1, -(-min_tokens // epoch_tokens))
    parts = []
    for epoch in range(epochs):
        for i in np.random.default_rng([seed, epoch]).permutation(len(ref)):
            parts.append(tokens[offsets[i]: offsets[i] + lengths[i] + 1])  # the document and its EOS
    return np.concatenate(parts), store


def train_reference_models(cfg: RefModelsConfig, run: RunDir) -> dict[str, Any]:
    cfg.validate()
    stream, store = ref_stream(run, cfg.seed, max(cfg.weak_tokens, cfg.strong_tokens) + 1)
    stages = [StageRange("ref", 0, len(stream))]
    heldout = heldout_sets(run, cfg.heldout_max_tokens_per_set) if cfg.heldout_max_tokens_per_set else {}
    tokenizer_dir = run.path("tokenize", "tokenizer")
    counts: dict[str, Any] = {"ref_stream_tokens": len(stream)}
    for name in MODEL_NAMES:
        log.info("refmodels: training the %s model", name)
        result = fit(cfg.train_config(name), stream, stages, run.path("refmodels", "train", name),
                     eos_id=store.eos_id, vocab_size=store.vocab_size, heldout=heldout,
                     tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None,
                     hf_dir=run.path("refmodels", name))
        counts[f"{name}_params"] = result["params"]
        counts[f"{name}_tokens"] = result["tokens"]
        if "final_heldout_loss" in result:
            counts[f"{name}_heldout_loss"] = result["final_heldout_loss"]
    if counts.get("strong_heldout_loss", -math.inf) >= counts.get("weak_heldout_loss", math.inf):
        log.warning("refmodels: the strong model's held-out loss (%.3f) is not below the weak model's (%.3f); PD will "
                    "mostly measure noise. Give the strong model more tokens or a larger preset, or ingest a larger ref split",
                    counts["strong_heldout_loss"], counts["weak_heldout_loss"])
    return counts
