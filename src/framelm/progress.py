"""Progress bars for every stage, and the one switch (the CLI's --quiet) that hides them all.

The switch is the environment variable TQDM_DISABLE, because it also reaches the bars of
libraries that framelm calls and of the processes it starts. tqdm itself reads the variable
only once, when it is first imported, which may be before the CLI has parsed --quiet; bars made
here read it when they are made, so the order of imports does not matter.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


def set_quiet() -> None:
    os.environ["TQDM_DISABLE"] = "1"


def quiet() -> bool:
    """Whether bars are hidden; any non-empty TQDM_DISABLE hides them, as tqdm reads it."""
    return bool(os.environ.get("TQDM_DISABLE"))


def progress_bar(iterable: Any = None, *, disable: bool = False, **kwargs: Any) -> "tqdm":
    """A tqdm bar, hidden under --quiet or where `disable` says so (e.g. on every rank but the first)."""
    from tqdm.auto import tqdm  # imported here: importing it reads TQDM_DISABLE, which set_quiet may not have set yet

    return tqdm(iterable, disable=disable or quiet(), **kwargs)
