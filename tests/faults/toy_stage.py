"""A toy sharded stage for testing the fault harness itself: `python toy_stage.py toy --run-dir RUN`.

With `--atomic` (the default) it follows framelm's rules: shards written through `atomic_path`,
a `.done` marker after each, finished shards skipped on restart. With `--no-atomic` it writes
JSON files in two halves under their final names, the bug the harness must catch.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from framelm import fsutil
from framelm.config import StageConfig, field


@dataclass
class ToyConfig(StageConfig):
    shards: int = field(4, help="number of shards")
    atomic: bool = field(True, help="write through atomic_path (False: the bug to catch)")
    shard_seconds: float = field(0.25, help="time each shard takes", hash=False)


def toy_stage(cfg: ToyConfig, run) -> dict:
    out = run.path("toy")
    for i in range(cfg.shards):
        shard = out / f"part-{i:05d}.json"
        if fsutil.is_done(shard):
            continue
        body = json.dumps({"shard": i, "values": list(range(i * 100, i * 100 + 100))})
        if cfg.atomic:
            time.sleep(cfg.shard_seconds)
            fsutil.write_text(shard, body)
            fsutil.mark_done(shard)
        else:
            with open(shard, "w") as fh:
                fh.write(body[: len(body) // 2])
                fh.flush()
                time.sleep(cfg.shard_seconds)
                fh.write(body[len(body) // 2:])
    return {"shards": cfg.shards}


if __name__ == "__main__":
    from framelm import cli, stages

    stages.STAGES["toy"] = stages.Stage("toy", f"{__name__}:ToyConfig", f"{__name__}:toy_stage", (), "toy sharded stage")
    sys.exit(cli.main())
