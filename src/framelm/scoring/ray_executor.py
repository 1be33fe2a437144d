"""Score shards with a Ray Data actor pool: the same `ShardScorer`, one model copy per actor.

Each actor loads both reference models once and scores whole shards, writing the same
RUN/score/shards/part-NNNNN.parquet files and .done markers as the in-process executor (so a
run may switch executors between restarts). Uses the running Ray cluster if `ray.init` was
called, else starts a local one. Actors ask for one GPU each when CUDA is present.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from framelm.errors import require_module

log = logging.getLogger("framelm")


class _ShardActor:
    """Ray Data callable class: holds the models, scores the shard numbers it is given."""

    def __init__(self, config: dict[str, Any], run_root: str):
        from framelm.rundir import RunDir
        from framelm.score import ScoreConfig, ShardScorer

        self.shards = ShardScorer(ScoreConfig.from_dict(config), RunDir(Path(run_root), create=False))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        docs = [self.shards.score(int(k)) for k in batch["shard"]]
        return {"shard": batch["shard"], "docs": np.array(docs, dtype=np.int64)}


def score_shards_ray(cfg: Any, run: Any, shards: list[int]) -> int:
    """Score `shards` on Ray; return the number of documents scored."""
    ray = require_module("ray", "ray[data]", "executor: ray")
    import torch

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    gpus = 1 if torch.cuda.is_available() else 0
    config = cfg.to_dict()
    config.update(rank=0, world_size=1)  # the actor scores what it is given; sharding happened here
    dataset = ray.data.from_items([{"shard": k} for k in shards]).map_batches(
        _ShardActor,
        fn_constructor_kwargs={"config": config, "run_root": str(run.root)},
        batch_size=1,
        concurrency=min(cfg.ray_actors, len(shards)),
        num_gpus=gpus,
    )
    done = sum(int(row["docs"]) for row in dataset.iter_rows())
    log.info("score: Ray scored %d shards (%d documents)", len(shards), done)
    return done
