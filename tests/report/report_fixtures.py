"""A fabricated run directory for the framelm.report tests, and a parser of the page's images.

Imported by the tests of tests/report (`from report_fixtures import ...`) and by its conftest.py."""

from __future__ import annotations

import html.parser
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from framelm.labels import write_labels
from framelm.rundir import RunDir


SOURCES = ("books", "math", "web")
SCHEDULES = ("frame", "random")
FRAME_ORDER = ("Q3", "Q4", "Q1", "Q2")
TASKS = ("copa", "piqa")


# -- a fabricated run directory that follows docs/ARCHITECTURE.md -------------------------------

def write_partition(root: Path, rng: np.random.Generator, n_docs: int = 400, with_cuts: bool = True) -> dict:
    source = rng.choice(SOURCES, n_docs)
    ppl = np.exp(rng.normal(3.0, 0.6, n_docs) + (source == "books") * 0.5)
    pd_ = rng.normal(0.3, 0.1, n_docs) - (source == "books") * 0.05
    split = np.where(rng.random(n_docs) < 0.9, "train", "heldout")
    # FRAME's default: nested medians fit on the training documents.
    train = split == "train"
    ppl_cut = float(np.median(ppl[train]))
    ppl_bin = (ppl > ppl_cut).astype(np.int8)
    pd_cuts = [float(np.median(pd_[train & (ppl_bin == b)])) for b in (0, 1)]
    pd_bin = (pd_ > np.where(ppl_bin == 1, pd_cuts[1], pd_cuts[0])).astype(np.int8)
    quadrant = np.array([f"Q{1 + 2 * a + b}" for a, b in zip(ppl_bin, pd_bin)])
    n_tokens = rng.integers(20, 400, n_docs)
    table = pa.table({
        "id": [f"doc{i}" for i in range(n_docs)], "source": source, "split": split, "n_tokens": n_tokens,
        "ppl": ppl, "pd": pd_, "ppl_bin": ppl_bin, "pd_bin": pd_bin, "quadrant": quadrant,
    })
    for stage in ("score", "partition"):
        (root / stage).mkdir(parents=True)
    scores = root / "score" / "scores.parquet"
    pq.write_table(table.drop_columns(["ppl_bin", "pd_bin", "quadrant"]), scores)
    write_labels(root / "partition" / "quadrants.parquet", scores, [("Q1", 0, 0), ("Q2", 0, 1), ("Q3", 1, 0), ("Q4", 1, 1)],
                 [2 * ppl_bin.astype(np.int16) + pd_bin])
    summary = {"excluded": {"no_score": 3}, "cut_points": []}
    if with_cuts:  # the shape framelm.partition writes for a nested split
        summary["cut_points"] = [{"axis": "ppl", "source": None, "ppl_bin": None, "cuts": [ppl_cut]}] + [
            {"axis": "pd", "source": None, "ppl_bin": b, "cuts": [c]} for b, c in enumerate(pd_cuts)]
    (root / "partition" / "summary.json").write_text(json.dumps(summary))
    return {"table": table, "ppl_cut": ppl_cut, "pd_cuts": pd_cuts}


def write_schedules(root: Path, table: pa.Table, rng: np.random.Generator) -> None:
    """frame: quadrants in FRAME's order; random: shuffled, cut into the same stage budgets.
    Stage tokens are stream tokens, each document's n_tokens and its EOS."""
    t = table.filter(pa.compute.equal(table["split"], "train")).to_pydict()
    rows = list(zip(t["id"], t["source"], t["quadrant"], t["n_tokens"]))
    frame = sorted(rows, key=lambda r: FRAME_ORDER.index(r[2]))
    budgets = [sum(r[3] + 1 for r in rows if r[2] == q) for q in FRAME_ORDER]
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    for name, docs in (("frame", frame), ("random", shuffled)):
        stream_tokens = np.array([r[3] + 1 for r in docs])
        cum = np.cumsum(stream_tokens) - stream_tokens
        stage = np.searchsorted(np.cumsum(budgets), cum, side="right").astype(np.int32)
        d = root / "schedule" / name
        d.mkdir(parents=True)
        pq.write_table(pa.table({
            "position": np.arange(len(docs), dtype=np.int64), "id": [r[0] for r in docs],
            "stage": stage, "source": [r[1] for r in docs], "quadrant": [r[2] for r in docs],
            "n_tokens": np.array([r[3] for r in docs], dtype=np.int64), "epoch": np.zeros(len(docs), dtype=np.int32),
        }), d / "order.parquet")
        ends = np.cumsum(budgets).tolist()
        stages = [{"name": f"{name}-{i}", "start_token": s, "end_token": e}
                  for i, (s, e) in enumerate(zip([0, *ends[:-1]], ends))]
        (d / "stages.yaml").write_text(yaml.safe_dump({"stages": stages}))
        meta = root / "export" / name / "stream"
        meta.mkdir(parents=True)
        (meta / "meta.json").write_text(json.dumps({"dtype": "uint16", "n_tokens": ends[-1], "eos_id": 0,
                                                    "vocab_size": 512, "stages": stages}))


def write_logs(root: Path, seeds: tuple[int, ...], rng: np.random.Generator, steps: int = 40) -> None:
    for name in SCHEDULES:
        for seed in seeds:
            d = root / "train" / name / f"seed{seed}"
            d.mkdir(parents=True)
            lines = []
            for step in range(1, steps + 1):
                tokens = step * 1024
                loss = 6.0 * math.exp(-step / 15) + 2.0 + rng.normal(0, 0.05)
                lines.append({"type": "train", "step": step, "tokens": tokens, "loss": loss, "lr": 1e-3, "stage": 0})
                if step % 10 == 0:
                    lines.append({"type": "heldout", "step": step, "tokens": tokens, "losses": {
                        "all": loss + 0.1, "source/web": loss + 0.2, "quadrant/Q1": loss + 0.05}})
            (d / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def t_test(diff: float, stderr: float | None, n_seeds: int) -> dict:
    """The diff_* columns framelm.compare writes for a difference paired over n_seeds seeds."""
    from scipy import stats

    if stderr is None or n_seeds < 2:
        return {"diff_stderr": None, "diff_paired": True, "diff_df": None, "diff_p": None}
    return {"diff_stderr": stderr, "diff_paired": True, "diff_df": n_seeds - 1,
            "diff_p": float(2 * stats.t.sf(abs(diff) / stderr, n_seeds - 1))}


def write_compare(root: Path, seeds: tuple[int, ...], rng: np.random.Generator, frame_diff: float = -0.05,
                  diff_stderr: float | None = 0.01, **extra) -> None:
    """A compare/results.json; `extra` goes to its top level (same_documents, ...)."""
    runs = []
    for name in SCHEDULES:
        for seed in seeds:
            tasks = {t: {"acc": float(rng.uniform(0.4, 0.7)), "acc_stderr": 0.03, "acc_norm": 0.5,
                         "acc_norm_stderr": 0.03, "n": 100} for t in TASKS}
            runs.append({"schedule": name, "seed": seed, "train_key": f"train/{name}/seed{seed}",
                         "eval_key": f"eval/{name}-seed{seed}", "tokens": 40960,
                         "results": {"heldout": {"all": {"loss": 3.0, "bpb": 1.2, "tokens": 5000}}, "tasks": tasks}})
    n = len(seeds)
    table = [
        {"metric": "heldout_loss/all", "schedule": "random", "mean": 3.10, "stderr": 0.01, "n_seeds": n,
         "diff_vs_random": None, **t_test(0, None, n)},
        {"metric": "heldout_loss/all", "schedule": "frame", "mean": 3.10 + frame_diff, "stderr": 0.01,
         "n_seeds": n, "diff_vs_random": frame_diff, **t_test(frame_diff, diff_stderr, n)},
        {"metric": "heldout_loss/source/all-caps", "schedule": "frame", "mean": 3.0, "stderr": 0.01,
         "n_seeds": n, "diff_vs_random": 0.5, **t_test(0.5, 0.01, n)},  # not the overall held-out loss
        {"metric": "piqa/acc", "schedule": "frame", "mean": 0.55, "stderr": 0.02, "n_seeds": n,
         "item_stderr": 0.04, "diff_vs_random": 0.01, **t_test(0.01, 0.02, n)},
    ]
    (root / "compare").mkdir(parents=True)
    (root / "compare" / "results.json").write_text(json.dumps({"schedules": list(SCHEDULES), "seeds": list(seeds),
                                                               "runs": runs, "table": table, **extra}))


def make_run(root: Path, seeds: tuple[int, ...] = (0, 1), parts: tuple[str, ...] = ("partition", "schedule", "train", "compare")) -> RunDir:
    rng = np.random.default_rng(0)
    part = write_partition(root, rng)
    if "schedule" in parts:
        write_schedules(root, part["table"], rng)
    if "train" in parts:
        write_logs(root, seeds, rng)
    if "compare" in parts:
        write_compare(root, seeds, rng)
    if "partition" not in parts:
        shutil.rmtree(root / "partition")
    return RunDir(root)


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def page_images(report: Path) -> _Images:
    parser = _Images()
    parser.feed((report / "index.html").read_text())
    return parser
