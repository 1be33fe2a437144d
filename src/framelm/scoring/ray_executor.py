"""Score shards with a Ray Data actor pool: the same `ShardScorer`, one model copy per actor.

Each actor loads both reference models once and scores whole shards, writing the same
RUN/score/shards/part-NNNNN.parquet files and .done markers as the in-process executor (so a
run may switch executors between restarts). Uses the running Ray cluster if `ray.init` was
called, else starts a local one. Actors ask for one GPU each when CUDA is present; without
one, each reserves CPU cores and runs torch on exactly that many threads. Ray would otherwise
give an actor one thread (OMP_NUM_THREADS=1), which is slow and sums floats in another order
than a local run on the same machine, so the shards would differ in their last bits.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from framelm.errors import FramelmError, require_module

log = logging.getLogger("framelm")


class _ShardActor:
    """Ray Data callable class: holds the models, scores the shard numbers it is given."""

    def __init__(self, config: dict[str, Any], run_root: str, cpu_threads: int | None):
        import torch

        from framelm.rundir import RunDir
        from framelm.score import ScoreConfig, ShardScorer

        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
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
    actors = min(cfg.ray_actors, len(shards))
    if torch.cuda.is_available():
        gpus, cpus, threads = 1, 1, None
    else:
        # An actor lives on one machine: asking for more cores than the largest has would leave
        # it unplaced, and the run would wait forever.
        largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
        if cfg.ray_cpus_per_actor is not None and cfg.ray_cpus_per_actor > largest:
            raise FramelmError(f"'ray_cpus_per_actor' = {cfg.ray_cpus_per_actor}, but the largest machine of the Ray "
                               f"cluster has {largest} CPUs; ask for at most {largest}")
        share = int(ray.cluster_resources().get("CPU", 1)) // actors
        cpus = cfg.ray_cpus_per_actor or max(1, min(largest, share))
        gpus, threads = 0, cpus
    config = cfg.to_dict()
    config.update(rank=0, world_size=1)  # the actor scores what it is given; sharding happened here
    dataset = ray.data.from_items([{"shard": k} for k in shards]).map_batches(
        _ShardActor,
        fn_constructor_kwargs={"config": config, "run_root": str(run.root), "cpu_threads": threads},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),  # a fixed pool: `concurrency` is deprecated
        num_gpus=gpus,
        num_cpus=cpus,
    )
    done = sum(int(row["docs"]) for row in dataset.iter_rows())
    log.info("score: Ray scored %d shards (%d documents)", len(shards), done)
    return done
