"""The `run` fixture: a run directory with a partition, for the tests that run the whole stage.
Plain helpers shared by several files live in schedule_fixtures.py."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.partition import PartitionConfig, partition_documents
from framelm.rundir import RunDir


@pytest.fixture
def run(tmp_path):
    """A run directory with a partition of 600 scored documents (3 sources, 10 % held out; d0001
    has no usable score, so no label)."""
    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(0)
    n = 600
    run.path("score").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [f"d{i:04d}" for i in range(n)], "source": rng.choice(["web", "math", "books"], n).tolist(),
        "split": np.where(np.arange(n) % 10 == 0, "heldout", "train").tolist(),
        "n_tokens": pa.array(rng.integers(1, 80, n), pa.int64()),
        "ppl": rng.lognormal(2, 0.5, n), "pd": rng.beta(2, 5, n), "status": ["ok", "too_short"] + ["ok"] * (n - 2),
    }), run.path("score/scores.parquet"))
    partition_documents(PartitionConfig(), run)
    return run
