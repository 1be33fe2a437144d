"""Held-out evaluation sets and the loss of a framelm model on them.

Reads RUN/tokenize/{index.parquet, meta.json, tokens.bin} (documents with split == "heldout")
and, when it exists, RUN/partition/quadrants.parquet with RUN/score/scores.parquet (the partition
labels held-out documents too).
Writes nothing. The training loop logs these losses every few steps; the eval stage reuses
`heldout_sets` and `heldout_loss` on any framelm model.

Each set takes documents in one fixed pseudo-random order (so a capped "all" set follows the
corpus' natural mix rather than the index's file order) until `max_tokens_per_set` is reached.
`unigram_loss` gives the floor a model must beat to have learned anything beyond token
frequencies: the loss of a unigram model of the training documents' tokens on the same set.

Loss is measured with the document mask on: each document is read after an EOS (which opens
it) and never sees another document or a cut of itself placed by its neighbours, so its loss
does not depend on which documents share its rows. Only the documents' own tokens are scored (predicting an EOS is not), so
bits per byte = summed NLL / ln 2 / the documents' UTF-8 bytes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from framelm.errors import FramelmError
from framelm.labels import LABELS, SCORES, read_labels
from framelm.rundir import RunDir
from framelm.tokenstore import TokenStore

SHUFFLE_SEED = 0


@dataclasses.dataclass
class HeldoutSet:
    """Documents (token arrays without EOS) and their total UTF-8 bytes."""

    name: str
    docs: list[np.ndarray]
    n_bytes: int

    @property
    def n_tokens(self) -> int:
        return int(sum(len(d) for d in self.docs))


def _heldout_quadrants(run: RunDir) -> pd.Series:
    """Quadrant by id of the labelled held-out documents; the other rows' ids are never copied."""
    codes, cells = read_labels(run)
    scores = pq.read_table(run.path(SCORES), columns=["id", "split"])
    rows = np.flatnonzero((codes >= 0) & pc.equal(scores.column("split"), "heldout").fill_null(False).to_numpy(zero_copy_only=False))
    names = np.array([c[0] for c in cells], dtype=object)
    by_id = pd.Series(names[codes[rows]], index=scores.column("id").take(rows).to_pandas())
    return by_id[~by_id.index.duplicated()]


def heldout_sets(run: RunDir, max_tokens_per_set: int = 200_000) -> dict[str, HeldoutSet]:
    """Sets "all", "source/<s>" and (with a partition) "quadrant/<q>" of held-out documents."""
    tokens = TokenStore.open(run).tokens
    index_path = run.path("tokenize", "index.parquet")
    index = pq.read_table(index_path, columns=["id", "source", "split", "offset", "n_tokens", "n_bytes"]).to_pandas()
    docs = index[index["split"] == "heldout"].reset_index(drop=True)
    if docs.empty:
        return {}
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(docs))
    docs = docs.iloc[order].reset_index(drop=True)
    groups: dict[str, np.ndarray] = {"all": np.ones(len(docs), dtype=bool)}
    for source in sorted(docs["source"].unique()):
        groups[f"source/{source}"] = (docs["source"] == source).to_numpy()
    if run.path(LABELS).is_file():
        quadrant = docs["id"].map(_heldout_quadrants(run))
        for q in sorted(quadrant.dropna().unique()):
            groups[f"quadrant/{q}"] = (quadrant == q).to_numpy()
    out = {}
    for name, member in groups.items():
        chosen, n_bytes, budget = [], 0, max_tokens_per_set
        for row in docs[member].itertuples():
            if budget <= 0:
                break
            if row.offset < 0 or row.offset + row.n_tokens > len(tokens):
                raise FramelmError(f"{index_path}: document {row.id!r} has offset {row.offset} + n_tokens {row.n_tokens} beyond tokens.bin ({len(tokens)} tokens)")
            if row.n_tokens == 0:
                continue
            chosen.append(np.asarray(tokens[row.offset: row.offset + row.n_tokens], dtype=np.int64))
            n_bytes += int(row.n_bytes)
            budget -= int(row.n_tokens)
        if chosen:
            out[name] = HeldoutSet(name, chosen, n_bytes)
    return out


def document_windows(docs: list[np.ndarray], eos_id: int, seq_len: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(document index, inputs, targets) of every window the held-out loss scores, in order.

    Each document is read as `EOS doc`; a document longer than `seq_len` is cut into windows of
    seq_len predictions, and a later window sees only its own tokens. Over all windows, exactly
    the documents' tokens are targets, each once.
    """
    windows = []
    for d, doc in enumerate(docs):
        seq = np.concatenate([[eos_id], doc]).astype(np.int64)
        windows.extend((d, seq[s: s + seq_len], seq[s + 1: s + seq_len + 1]) for s in range(0, len(doc), seq_len))
    return windows


def packed_rows(docs: list[np.ndarray], eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the documents' windows (`document_windows`) into (rows, seq_len) inputs and targets.

    A continuation window starts a row because it has no EOS to open it. Windows are packed
    greedily and never straddle rows, so a document's loss does not depend on its neighbours.
    Targets not to be scored (padding) are -100.
    """
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for _, x, y in document_windows(docs, eos_id, seq_len):
        if rows[-1] and (used + len(x) > seq_len or x[0] != eos_id):
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += len(x)
    inputs = np.full((len(rows), seq_len), eos_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), -100, dtype=np.int64)
    for r, row in enumerate(rows):
        position = 0
        for x, y in row:
            inputs[r, position: position + len(x)] = x
            targets[r, position: position + len(y)] = y
            position += len(x)
    return inputs, targets


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, hset: HeldoutSet, eos_id: int, seq_len: int,
                 batch_rows: int = 8, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean NLL (nats per token) and bits per byte of `model` (a FrameLM) on one set."""
    was_training = model.training
    model.eval()
    inputs, targets = packed_rows(hset.docs, eos_id, seq_len)
    # Pad to whole batches (EOS rows predicting nothing): one batch shape for compiled blocks.
    pad = -len(inputs) % batch_rows
    inputs = np.concatenate([inputs, np.full((pad, seq_len), eos_id, dtype=inputs.dtype)])
    targets = np.concatenate([targets, np.full((pad, seq_len), -100, dtype=targets.dtype)])
    total_nll = 0.0
    for start in range(0, len(inputs), batch_rows):
        x = torch.from_numpy(inputs[start: start + batch_rows]).to(device)
        y = torch.from_numpy(targets[start: start + batch_rows]).to(device)
        logits = model(x, eos_id).float()
        total_nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
    model.train(was_training)
    n_tokens = hset.n_tokens
    return {
        "loss": total_nll / n_tokens,
        "bpb": total_nll / math.log(2) / max(hset.n_bytes, 1),
        "tokens": n_tokens,
        "bytes": hset.n_bytes,
    }


# A unigram estimate settles long before this; it bounds the read of a large token store.
UNIGRAM_MAX_TOKENS = 100_000_000
UNIGRAM_BATCH_TOKENS = 1 << 24


def train_token_counts(run: RunDir, max_tokens: int = UNIGRAM_MAX_TOKENS) -> np.ndarray:
    """How often each token id occurs in the train-split documents (their EOS not counted, as
    held-out loss never scores one): all of them, or on a larger corpus whole documents in a
    fixed pseudo-random order until `max_tokens`."""
    store = TokenStore.open(run)
    index = pq.read_table(run.path("tokenize", "index.parquet"), columns=["split", "offset", "n_tokens"])
    train = pc.equal(index.column("split"), "train").fill_null(False).to_numpy(zero_copy_only=False)
    offsets = index.column("offset").to_numpy()[train]
    lengths = index.column("n_tokens").to_numpy()[train]
    if lengths.sum() > max_tokens:
        order = np.random.default_rng(SHUFFLE_SEED).permutation(len(offsets))
        order = order[: int(np.searchsorted(np.cumsum(lengths[order]), max_tokens)) + 1]
        offsets, lengths = offsets[order], lengths[order]
    by_offset = np.argsort(offsets, kind="stable")  # reads in file order
    offsets, lengths = offsets[by_offset], lengths[by_offset]
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    batch: list[np.ndarray] = []
    held = 0
    for i, (offset, n) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        batch.append(np.asarray(store.tokens[offset: offset + n]))
        held += n
        if held >= UNIGRAM_BATCH_TOKENS or i == len(offsets) - 1:
            counts += np.bincount(np.concatenate(batch), minlength=store.vocab_size)[: store.vocab_size]
            batch, held = [], 0
    return counts


def unigram_loss(counts: np.ndarray, hset: HeldoutSet) -> float:
    """Mean NLL (nats per token) on the set of the unigram model `counts` gives, add-one smoothed
    so that a token never seen in training has a finite loss."""
    log_p = np.log(counts + 1.0) - math.log(float(counts.sum()) + len(counts))
    return float(-sum(log_p[doc].sum() for doc in hset.docs) / hset.n_tokens)
