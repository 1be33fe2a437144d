"""From stages to one document stream: assemble concatenates a schedule's stages and blends
each boundary along a transition curve (transition_share) into a Stream."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from framelm.errors import ConfigError
from framelm.schedule.corpus import code_dtype
from framelm.schedule.strategies import Stage


def transition_share(kind: str, u: np.ndarray, steepness: float = 10.0) -> np.ndarray:
    """The next stage's share at relative position u in [0, 1] of a transition window."""
    u = np.asarray(u, float)
    if kind == "hard":
        return (u >= 0.5).astype(float)
    if kind == "linear":
        return np.clip(u, 0.0, 1.0)
    if kind == "logistic":
        lo, hi = 1 / (1 + math.exp(steepness / 2)), 1 / (1 + math.exp(-steepness / 2))
        return np.clip((1 / (1 + np.exp(-steepness * (u - 0.5))) - lo) / (hi - lo), 0.0, 1.0)
    raise ConfigError(f"unknown transition {kind!r}; choose hard, linear or logistic")


def _interleave(wa: np.ndarray, wb: np.ndarray, kind: str, steepness: float) -> np.ndarray:
    """Merge order of a window made of stage A's tail (token weights wa) and stage B's head (wb).

    Returns a permutation of range(len(wa) + len(wb)) (A's documents first in the index space).
    Each document gets the window position u at which its stage's cumulative share reaches its
    token midpoint: B documents follow the integral of the share curve s, A documents that of
    1 - s. Sorting by u interleaves them so the realised token share of B tracks s.
    """
    grid = np.linspace(0.0, 1.0, 2049)
    s = transition_share(kind, grid, steepness)
    cum_b = np.concatenate([[0.0], np.cumsum((s[1:] + s[:-1]) / 2)])
    cum_a = np.concatenate([[0.0], np.cumsum((2 - s[1:] - s[:-1]) / 2)])
    cum_b, cum_a = cum_b / cum_b[-1], cum_a / cum_a[-1]
    fa = (np.cumsum(wa) - wa / 2) / wa.sum()
    fb = (np.cumsum(wb) - wb / 2) / wb.sum()
    ua = np.interp(fa, cum_a, grid)
    ub = np.interp(fb, cum_b, grid)
    return np.argsort(np.concatenate([ua, ub]), kind="stable")


@dataclass
class Stream:
    """A schedule as one document stream: each document's row, epoch, stage and tokens."""

    names: list[str]  # of the stages
    idx: np.ndarray
    epoch: np.ndarray
    stage: np.ndarray  # index into names
    weight: np.ndarray
    # (stage, next stage, documents each gives to the window between them) per smooth boundary
    blends: list[tuple[str, str, int, int]] = dataclasses.field(default_factory=list)


def _docs_within(weight: np.ndarray, tokens: float) -> int:
    """How many leading documents of `weight` fit in `tokens` (their running sum stays <= tokens).
    The running sum grows a doubling block at a time: a window is a small share of a stage."""
    at, before, block = 0, 0, 1 << 16
    while at < len(weight):
        cum = np.cumsum(weight[at:at + block], dtype=np.int64)
        cum += before
        k = int(np.searchsorted(cum, tokens, side="right"))
        if k < len(cum):
            return at + k
        at, before, block = at + len(cum), int(cum[-1]), 2 * block
    return len(weight)


def assemble(stages: list[Stage], kind: str, window: float, steepness: float) -> Stream:
    """Concatenate stages into one stream, blending each boundary.

    Empties `stages` as it goes, so each stage's arrays are freed once copied (at 100 M
    documents the stages and the stream would otherwise be 2.5 GB at once). The epoch array
    starts as untouched zero pages and only stages with repeats write into it."""
    names = [st.name for st in stages]
    tokens = [int(st.weight.sum()) for st in stages]
    head = [0] * len(stages)  # documents of each stage's start that go into the window before it
    tail = [0] * len(stages)
    # A stage without tokens has no window of its own: its neighbours blend with each other.
    filled = [k for k, t in enumerate(tokens) if t > 0]
    following = dict(zip(filled, filled[1:]))
    blends = []
    if kind != "hard" and window > 0:
        for k, j in following.items():
            half = window * min(tokens[k], tokens[j]) / 2
            tail[k] = _docs_within(stages[k].weight[::-1], half)
            head[j] = _docs_within(stages[j].weight, half)
            blends.append((names[k], names[j], tail[k], head[j]))
            if tail[k] == 0 or head[j] == 0:
                tail[k] = head[j] = 0
    n = sum(len(st.idx) for st in stages)
    idx = np.empty(n, np.result_type(np.int32, *(st.idx.dtype for st in stages)))
    weight = np.empty(n, np.result_type(np.int32, *(st.weight.dtype for st in stages)))
    epoch, label = np.zeros(n, np.int32), np.empty(n, code_dtype(len(stages)))

    def put(out: np.ndarray, part: slice, values: np.ndarray) -> None:
        if out is not epoch or (len(values) and values.max() > 0):
            out[part] = values

    at = 0
    for k in range(len(stages)):
        st = stages[k]
        lo, hi = head[k], len(st.idx) - tail[k]
        part = slice(at, at + hi - lo)
        for out, values in ((idx, st.idx), (epoch, st.epoch), (weight, st.weight)):
            put(out, part, values[lo:hi])
        label[part] = k
        at += hi - lo
        if tail[k]:
            j = following[k]
            nxt, m = stages[j], tail[k] + head[j]
            order = _interleave(st.weight[hi:], nxt.weight[:head[j]], kind, steepness)
            part = slice(at, at + m)
            for out, a, b in ((idx, st.idx, nxt.idx), (epoch, st.epoch, nxt.epoch), (weight, st.weight, nxt.weight)):
                put(out, part, np.concatenate([a[hi:], b[:head[j]]])[order])
            label[part] = np.where(order >= tail[k], j, k)
            at += m
        stages[k] = None  # copied: let its arrays go
    stages.clear()
    return Stream(names, idx, epoch, label, weight, blends)
