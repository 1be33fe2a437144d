"""Averaging the weights of the last k checkpoints (EMA, SMA, WMA).

Luo et al. (arXiv 2511.18903) find that averaging the last few checkpoints keeps the benefit of
a data curriculum that strong learning-rate decay would otherwise erase. Weights over the
checkpoints, oldest first (theta_1 .. theta_k):

- sma: 1/k each;
- wma: i / (1 + 2 + ... + k), the newest weighted most;
- ema: avg_1 = theta_1, avg_i = d * avg_{i-1} + (1 - d) * theta_i, i.e. theta_1 gets d^(k-1)
  and theta_i (i >= 2) gets (1 - d) * d^(k-i).

Reads the checkpoints' model.safetensors one at a time; writes nothing itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from framelm.errors import FramelmError


def averaging_weights(k: int, method: str, ema_decay: float = 0.5) -> list[float]:
    """Weight of each of k checkpoints, oldest first; they sum to 1."""
    if k < 1:
        raise ValueError("need at least one checkpoint to average")
    if method == "sma":
        return [1.0 / k] * k
    if method == "wma":
        total = k * (k + 1) / 2
        return [i / total for i in range(1, k + 1)]
    if method == "ema":
        return [ema_decay ** (k - 1)] + [(1 - ema_decay) * ema_decay ** (k - i) for i in range(2, k + 1)]
    raise ValueError(f"unknown averaging method {method!r}")


def average_checkpoints(model_files: list[Path], method: str, ema_decay: float = 0.5) -> dict[str, torch.Tensor]:
    """Weighted average of the state dicts in `model_files` (oldest first), accumulated in fp64.

    Every file must hold the tensors of the first, by name and shape."""
    weights = averaging_weights(len(model_files), method, ema_decay)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path, w in zip(model_files, weights):
        state = load_file(str(path))
        if total:
            check_same_tensors(path, state, model_files[0], total)
        for name, tensor in state.items():
            dtypes[name] = tensor.dtype
            contribution = tensor.double() * w
            total[name] = total[name] + contribution if name in total else contribution
    return {name: t.to(dtypes[name]) for name, t in total.items()}


def check_same_tensors(path: Path, state: dict[str, torch.Tensor], first: Path, reference: dict[str, torch.Tensor]) -> None:
    """Raise, naming `path` and the first differing tensor, unless `state` has the names and shapes of `reference`
    (read from `first`): a missing tensor would get too little weight, a broadcastable shape a wrong average."""
    for name in sorted(state.keys() | reference.keys()):
        if name not in state:
            problem = f"lacks tensor {name!r}, which {first} has"
        elif name not in reference:
            problem = f"has tensor {name!r}, which {first} lacks"
        elif state[name].shape != reference[name].shape:
            problem = f"has tensor {name!r} of shape {tuple(state[name].shape)}, {first} of shape {tuple(reference[name].shape)}"
        else:
            continue
        raise FramelmError(f"{path} {problem}; checkpoints to average must come from one model")
