"""What torchrun tells each process it starts: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE.

Read in one place so that every stage agrees on which rank a process is and reports a bad value
the same way; without the variables (a plain `framelm ...`) the world is one process. Imports
nothing heavy: the CLI reads the world size before any stage loads torch.
"""

from __future__ import annotations

import os

from framelm.errors import FramelmError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise FramelmError(f"environment variable {name} = {value!r} must be an integer "
                           "(torchrun sets it for each process it starts)") from None


def rank() -> int:
    return _env_int("RANK", 0)


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """This process's index among those on its machine: the GPU it takes."""
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Processes on this machine; a one-machine job's world size where torchrun did not say."""
    return _env_int("LOCAL_WORLD_SIZE", world_size())
