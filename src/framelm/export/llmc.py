"""llm.c / modded-nanogpt token shards.

Writes RUN/export/<schedule>/llmc/train_000000.bin ... : each shard a header of 256 little-endian
int32 (magic 20240520, version 1, number of tokens, zeros) followed by that many uint16 tokens;
the stream is cut in order into ceil(n_tokens / `llmc_shard_tokens`) shards of near-equal size,
each (when there are several) between half of llmc_shard_tokens and llmc_shard_tokens (llm.c's dataloader asserts that
every shard holds more than num_processes * B * T tokens, which a short remainder shard would
break). Beside them, stages.json lists each shard's first token (`shard_starts`) and says where
each stage and each transition window starts and ends as (shard, offset in shard).
Refuses a vocabulary larger than 65536, which uint16 cannot hold.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np

from framelm import fsutil
from framelm.errors import FramelmError
from framelm.export.config import ExportConfig
from framelm.export.plan import ExportPlan, write_binary
from framelm.rundir import RunDir

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
MAX_VOCAB = 1 << 16


def shard_name(index: int) -> str:
    return f"train_{index:06d}.bin"


def write_llmc(plan: ExportPlan, cfg: ExportConfig, run: RunDir, out_dir: Path) -> dict[str, Any]:
    if plan.store.vocab_size > MAX_VOCAB:
        raise FramelmError(f"llm.c shards store uint16 tokens, but the tokenizer's vocab_size is "
                           f"{plan.store.vocab_size} (> {MAX_VOCAB}); export formats [stream, megatron, nanotron] instead")
    if plan.n_tokens == 0:
        # no shard would match llm.c's file pattern, and stages.json would point into a missing shard
        raise FramelmError(f"export/{plan.name}/llmc: the schedule holds no tokens, so there is no shard to write")
    size = cfg.llmc_shard_tokens
    n_shards = -(-plan.n_tokens // size)
    # near-equal shards rather than `size` pieces and a remainder, which llm.c may refuse as too short
    starts = [k * plan.n_tokens // n_shards for k in range(n_shards)] + [plan.n_tokens]  # and the stream end
    written = 0
    for k in range(n_shards):
        begin, end = starts[k], starts[k + 1]
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (MAGIC, VERSION, end - begin)
        pieces = (c.astype("<u2", copy=False) for c in plan.chunks(begin, end, cfg.chunk_tokens, f"{plan.name}/llmc {k}"))
        written += write_binary(out_dir / shard_name(k), [header.tobytes(), *pieces])

    def locate(token: int) -> dict[str, int]:
        shard = max(bisect.bisect_right(starts, token, hi=n_shards) - 1, 0)  # the stream end: in the last shard
        return {"shard": shard, "offset": token - starts[shard]}

    fsutil.write_json(out_dir / "stages.json", {
        "format": "llm.c uint16 shards: 256 int32 header (magic 20240520, version 1, n_tokens), then tokens",
        "max_shard_tokens": size, "n_tokens": plan.n_tokens, "eos_id": plan.store.eos_id,
        "shards": [shard_name(k) for k in range(n_shards)], "shard_starts": starts[:n_shards],
        "stages": [{"name": s.name, "start_token": s.start_token, "end_token": s.end_token,
                    "start": locate(s.start_token), "end": locate(s.end_token)} for s in plan.stages],
        "transitions": _transition_windows(plan, locate),
    })
    return {"files": n_shards, "files_written": written, "shards": n_shards}


def _transition_windows(plan: ExportPlan, locate: Any) -> list[dict[str, Any]]:
    """Where the schedule interleaves stages (merged sub-stage slices), in tokens and shard offsets."""
    windows: list[dict[str, Any]] = []
    for seg in plan.segments:
        if seg.kind != "transition":
            continue
        if windows and windows[-1]["end_token"] == seg.start_token:
            windows[-1]["end_token"] = seg.end_token
        else:
            windows.append({"start_token": seg.start_token, "end_token": seg.end_token})
    for w in windows:
        w["start"], w["end"] = locate(w["start_token"]), locate(w["end_token"])
    return windows
