"""Cut documents into context windows and pack the windows into dense batches.

A document scored by a reference model is the sequence `s = [bos] + tokens`; every token
`s[1:]` is predicted exactly once. A sequence longer than the model's window is cut into
overlapping windows: the first covers `s[0:window]` and predicts `s[1:window]`; each next one
ends `stride` tokens later, starts `window` tokens before its end, and predicts only the tokens
after the previous window's end, so every prediction sees at least `window - stride` tokens of
left context.

Windows up to `row_tokens` long (at most the window) are packed several per row (best-fit
decreasing into rows of `row_tokens`); a longer window gets a row of its own. Attention over a
packed row costs row length squared whatever the mask, so short rows keep short documents cheap.
Rows go into batches of at most `tokens_per_batch` padded tokens, longest first, so rows of
similar length share a batch. With `full_rows`, every batch instead has exactly
`tokens_per_batch // row_tokens` rows of `row_tokens` tokens (padding rows included), one shape
for a compiled model; that asks for `row_tokens` at least the window, so every window is packed.

Position ids restart at 0 for each window, which is how Hugging Face models recognise packed
sequences and build a block-diagonal causal mask (sdpa/eager) or call varlen kernels (flash
attention), and how framelm's backend numbers the windows of a row. Padding continues the positions of its row's last window:
causal attention never lets a real token see the padding after it, so a batch whose rows each
hold one window (`row_tokens=0`: no packing) needs no mask at all and runs the plain causal
kernel. Pure numpy, no torch: this runs on a background thread while the model works.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Window:
    """A slice `s[start:end]` of one document's sequence that predicts `s[first_target:end]`."""

    doc: int
    start: int
    end: int
    first_target: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclasses.dataclass
class PackedBatch:
    """Model inputs for one forward pass and where its predictions go.

    input_ids, position_ids: (rows, row_len) int64.
    hidden_index: flat index into the (rows * row_len) hidden states of each position whose
    output predicts a target; target_ids: the token it predicts; target_doc: the document it
    belongs to (index within the documents given to `pack_documents`).
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    hidden_index: np.ndarray
    target_ids: np.ndarray
    target_doc: np.ndarray
    packed: bool  # some row holds several windows: attention needs a mask by window


def plan_windows(doc: int, seq_len: int, window: int, stride: int) -> list[Window]:
    """The windows covering a sequence of `seq_len` tokens (BOS included); none if seq_len < 2."""
    if seq_len < 2:
        return []
    end = min(window, seq_len)
    windows = [Window(doc, 0, end, 1)]
    while end < seq_len:
        next_end = min(end + stride, seq_len)
        windows.append(Window(doc, next_end - window, next_end, end))
        end = next_end
    return windows


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: item indices per row, rows holding <= capacity tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item of {n} tokens does not fit a row of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            left, row = capacity - n, len(rows) - 1
        else:
            left, row = free.pop(k)
            rows[row].append(i)
            left -= n
        if left >= 2:  # the shortest window has 2 tokens (BOS + one token)
            bisect.insort(free, (left, row))
    return rows


def pack_documents(
    sequences: Sequence[np.ndarray], window: int, stride: int, tokens_per_batch: int, pad_id: int,
    row_tokens: int = 512, full_rows: bool = False,
) -> list[PackedBatch]:
    """Pack the windows of all `sequences` ([bos] + tokens each) into batches.

    The batches depend only on the arguments: the same documents always give the same batches.
    """
    if full_rows and row_tokens < window:
        raise ValueError(f"full rows of {row_tokens} tokens cannot hold windows of {window}")
    row_tokens = min(row_tokens, window)  # padding positions then stay below the window
    windows = [w for d, s in enumerate(sequences) for w in plan_windows(d, len(s), window, stride)]
    short = [i for i, w in enumerate(windows) if w.length <= row_tokens]
    rows = [[i] for i, w in enumerate(windows) if w.length > row_tokens]
    rows += [[short[j] for j in row] for row in pack_rows([windows[i].length for i in short], row_tokens)]
    row_lens = [sum(windows[i].length for i in row) for row in rows]
    # Longest rows first, so each batch pads to its first row's length and wastes little.
    row_order = sorted(range(len(rows)), key=lambda r: (-row_lens[r], r))
    if full_rows:
        per_batch = tokens_per_batch // row_tokens
        return [_build_batch([rows[r] for r in row_order[i:i + per_batch]], windows, sequences, pad_id, (per_batch, row_tokens))
                for i in range(0, len(row_order), per_batch)]
    batches = []
    group: list[int] = []
    for r in row_order:
        if group and (len(group) + 1) * row_lens[group[0]] > tokens_per_batch:
            batches.append(_build_batch([rows[g] for g in group], windows, sequences, pad_id))
            group = []
        group.append(r)
    if group:
        batches.append(_build_batch([rows[g] for g in group], windows, sequences, pad_id))
    return batches


def _build_batch(rows: list[list[int]], windows: list[Window], sequences: Sequence[np.ndarray], pad_id: int,
                 shape: tuple[int, int] | None = None) -> PackedBatch:
    """One batch of `rows`; `shape` (rows, row_len) pads it with rows of padding to a fixed shape."""
    n_rows, row_len = shape or (len(rows), max(sum(windows[i].length for i in row) for row in rows))
    input_ids = np.full((n_rows, row_len), pad_id, dtype=np.int64)
    position_ids = np.tile(np.arange(row_len, dtype=np.int64), (n_rows, 1))  # padding rows keep these
    hidden_index, target_ids, target_doc = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            w = windows[i]
            seq = sequences[w.doc]
            input_ids[r, offset:offset + w.length] = seq[w.start:w.end]
            # The last window's positions run on into the padding (see the module docstring).
            n = w.length if i != row[-1] else row_len - offset
            position_ids[r, offset:offset + n] = np.arange(n)
            # The output at sequence position p predicts token p + 1.
            first = r * row_len + offset + (w.first_target - w.start) - 1
            n = w.end - w.first_target
            hidden_index.append(np.arange(first, first + n, dtype=np.int64))
            target_ids.append(seq[w.first_target:w.end])
            target_doc.append(np.full(n, w.doc, dtype=np.int64))
            offset += w.length
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        hidden_index=np.concatenate(hidden_index),
        target_ids=np.concatenate(target_ids).astype(np.int64),
        target_doc=np.concatenate(target_doc),
        packed=any(len(row) > 1 for row in rows),
    )
