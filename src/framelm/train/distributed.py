"""Process-group setup for torchrun (RANK / WORLD_SIZE / LOCAL_RANK), and the single-process case.

The same training command runs on one CPU and under `torchrun --nproc_per_node N`: without the
torchrun variables the world is one process and no process group is created.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from framelm import launcher
from framelm.device import resolve_device


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str = "auto") -> World:
    """Read torchrun's variables, pick this rank's device, join the process group (gloo on CPU, nccl on CUDA)."""
    rank, size = launcher.rank(), launcher.world_size()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, dev)


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / world.size
    return value


def all_ranks_min_max(value: int, world: World) -> tuple[int, int]:
    """(smallest, largest) of an integer over all ranks; (value, value) in one process."""
    if not world.distributed:
        return value, value
    pair = torch.tensor([value, -value], dtype=torch.int64, device=world.device)
    dist.all_reduce(pair, op=dist.ReduceOp.MIN)  # one collective for both: max(v) = -min(-v)
    return int(pair[0]), -int(pair[1])


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
