"""Helpers shared by the schedule tests: small in-memory corpora and a yaml schedule file.

A module of its own rather than conftest.py, as tests/export/export_fixtures.py is: `from
conftest import` picks whichever conftest was imported first when pytest is given several
test folders.
"""

import numpy as np
import pyarrow as pa

from framelm.schedule import Corpus


FRAME_CELLS = [{"name": n, "ppl_bin": b[0], "pd_bin": b[1]} for n, b in
               [("Q1", (0, 0)), ("Q2", (0, 1)), ("Q3", (1, 0)), ("Q4", (1, 1))]]


def make_corpus(n_tokens, quadrant, source) -> Corpus:
    n = len(n_tokens)
    table = pa.table({"id": [f"d{i}" for i in range(n)], "source": source, "quadrant": quadrant,
                      "n_tokens": pa.array(n_tokens, pa.int64())})
    return Corpus.from_table(table, FRAME_CELLS)


def random_corpus(n=400, seed=0, sources=("web", "math", "books")) -> Corpus:
    rng = np.random.default_rng(seed)
    return make_corpus(rng.integers(1, 60, n).tolist(), rng.choice(["Q1", "Q2", "Q3", "Q4"], n).tolist(),
                       rng.choice(list(sources), n).tolist())


def write_yaml(tmp_path, text):
    path = tmp_path / "schedule.yaml"
    path.write_text(text)
    return path
