"""Turn a `device` setting ("auto", "cpu", "cuda", "cuda:N") into a torch.device.

Training, scoring and evaluation all run under the same torchrun layout, so one place decides
which GPU a rank uses and how a bad setting is reported; otherwise each stage would pick a
different GPU for the same setting, or fail deep inside torch where another stage fails clearly.
"""

from __future__ import annotations

import torch

from framelm import launcher
from framelm.errors import FramelmError


def resolve_device(device: str) -> torch.device:
    """This process's device: for "auto" or "cuda", this rank's GPU (cuda:LOCAL_RANK), and for
    "auto" the CPU where there is none; for "cuda:N", GPU N, except under a multi-process
    torchrun (see below)."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FramelmError(f"device = {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise FramelmError(f"device = {device!r} but CUDA is not available here; use --device cpu")
    count = torch.cuda.device_count()
    # Every rank of a torchrun job reads the same config, so a fixed cuda:N would put all of a
    # node's ranks on one GPU (NCCL refuses that); each rank takes its own GPU instead.
    if dev.index is None or launcher.world_size() > 1:
        local_rank = launcher.local_rank()
        # Two ranks on one GPU would fail in NCCL (training) or share its memory (scoring).
        if local_rank >= count:
            raise FramelmError(f"LOCAL_RANK = {local_rank} but this machine has {count} CUDA device(s); "
                               f"start at most {count} process(es) per node (torchrun --nproc_per_node={count})")
        return torch.device("cuda", local_rank)
    if dev.index >= count:
        raise FramelmError(f"device = {device!r} but this machine has {count} CUDA device(s), "
                           f"cuda:0 to cuda:{count - 1}")
    return dev
