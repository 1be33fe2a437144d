"""Training checkpoints: one folder per saved step, written atomically.

    checkpoints/step-00000100/model.safetensors   model weights (framelm names)
    checkpoints/step-00000100/trainer.pt          optimizer state and torch RNG states: plain
                                                  tensors and numbers, read with weights_only=True
    checkpoints/step-00000100/state.json          step, tokens and rows consumed, last lr, stream
                                                  fingerprint, config hash

The folder is built under a temporary name and renamed, so a checkpoint that exists is
complete. Only the newest checkpoint keeps trainer.pt (older ones are kept, weights only, for
checkpoint averaging).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from framelm import fsutil
from framelm.errors import FramelmError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder, from its name step-NNNNNNNN."""
    return int(STEP_DIR.match(path.name).group(1))


def save_checkpoint(root: Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                    state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step`; drop trainer.pt from older ones and all but the newest `keep`."""
    target = root / f"step-{step:08d}"
    with fsutil.atomic_path(target) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        if target.exists():  # a re-run after a kill between this rename and the next save
            shutil.rmtree(target)
    older = [p for p in checkpoint_dirs(root) if p != target]
    for p in older:
        (p / "trainer.pt").unlink(missing_ok=True)
    for p in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(p)
    return target


def load_state(path: Path) -> dict[str, Any]:
    # Older checkpoints keep no optimizer state, so there is no earlier one to resume from.
    return fsutil.read_json(path / "state.json", f"delete {path.parent.parent} (or run with --force) to start over")


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, trainer state, state.json) of one checkpoint folder."""
    state = load_state(path)
    trainer_file = path / "trainer.pt"
    if not trainer_file.is_file():
        raise FramelmError(f"{path} has no trainer.pt (only the newest checkpoint keeps optimizer state)")
    trainer_state = torch.load(trainer_file, map_location="cpu", weights_only=True)
    return load_file(str(path / "model.safetensors")), trainer_state, state
