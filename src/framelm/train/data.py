"""The training data: a token stream read strictly in order, packed into (rows, seq_len) batches.

Reads RUN/export/<schedule>/stream/{tokens.bin, meta.json} (or any token array with stage
ranges, for `fit`). Writes nothing.

Row r of the run covers stream tokens [r * seq_len, (r + 1) * seq_len + 1): inputs are its first
seq_len tokens, targets its last seq_len, so consecutive rows tile the stream and every token in
the budget is predicted once. Step s takes rows [s * R, (s + 1) * R) for R = global_batch_seqs,
and rank k of n takes the k-th of n equal slices of them. With a shuffle window, rows are
permuted (seeded) inside windows of consecutive rows that belong to one stage, so no row moves
across a stage boundary. Any step's batch is a pure function of the step: resuming needs only
the step number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from framelm.errors import FramelmError
from framelm.tokenstore import StageRange, check_stages, read_tokens

IGNORE = -100  # target of the position after the stream's last token


def read_stream(stream_dir: Path) -> tuple[np.ndarray, list[StageRange], dict]:
    """An exported stream as (memmapped tokens, stage ranges, meta)."""
    remedy = "export the schedule (again): framelm export --run-dir RUN --force"
    meta, tokens = read_tokens(stream_dir, remedy)
    meta_path = stream_dir / "meta.json"
    if not isinstance(meta.get("stages"), list):
        raise FramelmError(f"{meta_path}: missing key 'stages' (a list of name, start_token, end_token); {remedy}")
    try:
        stages = [StageRange(str(s["name"]), int(s["start_token"]), int(s["end_token"])) for s in meta["stages"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise FramelmError(f"{meta_path}: 'stages' must list entries with name, start_token, end_token ({exc!r})") from None
    check_stages(stages, len(tokens), str(meta_path))
    return tokens, stages, meta


def budget_steps(stream_tokens: int, max_tokens: int, tokens_per_step: int) -> int:
    """The whole optimizer steps a run takes from a stream: max_tokens (0: the whole stream) cut to whole steps."""
    return (max_tokens or stream_tokens) // tokens_per_step


def stream_fingerprint(tokens: np.ndarray, stages: list[StageRange]) -> str:
    """Content hash of the stream and its stage ranges (a checkpoint refuses other data)."""
    h = hashlib.sha256()
    h.update(json.dumps([dataclasses.astuple(s) for s in stages]).encode())
    h.update(str(tokens.dtype).encode())
    chunk = 1 << 24
    for start in range(0, len(tokens), chunk):
        h.update(np.ascontiguousarray(tokens[start: start + chunk]).tobytes())
    return h.hexdigest()[:24]


class BatchPlan:
    """Which stream tokens every step and rank reads."""

    def __init__(self, tokens: np.ndarray, stages: list[StageRange], seq_len: int, global_batch_seqs: int,
                 max_tokens: int = 0, shuffle_window_seqs: int = 0, seed: int = 0):
        self.tokens, self.stages, self.seq_len = tokens, stages, seq_len
        self.rows_per_step = global_batch_seqs
        budget = max_tokens or len(tokens)
        if budget > len(tokens):
            raise FramelmError(f"max_tokens = {max_tokens} exceeds the stream's {len(tokens)} tokens")
        self.n_steps = budget_steps(len(tokens), max_tokens, global_batch_seqs * seq_len)
        if self.n_steps == 0:
            raise FramelmError(
                f"the token budget ({budget}) is smaller than one step (global_batch_seqs {global_batch_seqs} x seq_len "
                f"{seq_len} = {global_batch_seqs * seq_len} tokens); lower them or raise max_tokens")
        n_rows = self.n_steps * self.rows_per_step
        stage_ends = np.array([s.end_token for s in stages])
        row_starts = np.arange(n_rows, dtype=np.int64) * seq_len
        self.row_stage = np.searchsorted(stage_ends, row_starts, side="right")  # stage index of each row
        self.row_order = self._shuffled_rows(shuffle_window_seqs, seed) if shuffle_window_seqs > 1 else None

    def _shuffled_rows(self, window: int, seed: int) -> np.ndarray:
        rows = np.arange(len(self.row_stage), dtype=np.int64)
        order = rows.copy()
        boundaries = np.flatnonzero(np.diff(self.row_stage)) + 1
        rng = np.random.default_rng(seed)
        for stage_rows in np.split(rows, boundaries):
            for start in range(0, len(stage_rows), window):
                chunk = stage_rows[start: start + window]
                order[chunk[0]: chunk[-1] + 1] = rng.permutation(chunk)
        return order

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.seq_len

    def stage_of_step(self, step: int) -> str:
        return self.stages[int(self.row_stage[step * self.rows_per_step])].name

    def rows(self, step: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets, each (count, seq_len) int64, for rows first..first+count of `step`."""
        T = self.seq_len
        inputs = np.empty((count, T), dtype=np.int64)
        targets = np.empty((count, T), dtype=np.int64)
        for i in range(count):
            r = step * self.rows_per_step + first + i
            if self.row_order is not None:
                r = int(self.row_order[r])
            chunk = np.asarray(self.tokens[r * T: r * T + T + 1], dtype=np.int64)
            inputs[i] = chunk[:T]
            targets[i, : len(chunk) - 1] = chunk[1:]
            targets[i, len(chunk) - 1:] = IGNORE
        return inputs, targets
