"""framelm.compare: the statistics by hand, and a real train + eval comparison on a tiny run."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.compare import (CompareConfig, build_table, check_same_budget, difference, format_table, mean_stderr,
                             table_csv)
from framelm.config import ConfigError
from framelm.errors import FramelmError
from framelm.evaluate import EvalConfig
from framelm.pipeline import run_stage
from framelm.rundir import RunDir
from framelm.train import TrainConfig

from train.tiny_run import make_tiny_run


def fake_results(loss: float, acc: float, acc_stderr: float = 0.05) -> dict:
    return {"model": "m", "heldout": {"all": {"loss": loss, "bpb": loss / math.log(2), "tokens": 100}},
            "tasks": {"piqa": {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": None, "n": 50}}}


def fake_runs(values: dict[str, dict[int, tuple[float, float]]]) -> list[dict]:
    return [{"schedule": s, "seed": seed, "train_key": f"train/{s}/seed{seed}", "eval_key": f"eval/{s}/seed{seed}",
             "tokens": 1000, "results": fake_results(*v)} for s, per_seed in values.items() for seed, v in per_seed.items()]


def test_mean_stderr_by_hand():
    mean, se = mean_stderr([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    # sample variance: ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = 7/3; se = sqrt(7/3 / 3)
    assert se == pytest.approx(math.sqrt(7 / 9))
    assert mean_stderr([3.0]) == (3.0, None)  # one seed: unknown, not zero


def test_difference_paired_by_seed_and_unpaired():
    frame, random = {0: 2.0, 1: 3.0, 2: 7.0}, {0: 1.0, 1: 1.5, 2: 4.0}
    diff, se = difference(frame, random)
    d = np.array([1.0, 1.5, 3.0])  # paired differences
    assert diff == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    diff, se = difference({0: 2.0, 1: 4.0}, {5: 1.0, 6: 2.0, 7: 6.0})  # no common seeds: unpaired
    assert diff == pytest.approx(3.0 - 3.0)
    assert se == pytest.approx(math.sqrt(2.0 / 2 + 7.0 / 3))  # sample variances 2 (2 seeds) and 7 (3 seeds)
    assert difference({0: 2.0}, {0: 1.0}) == (1.0, None)


def test_table_from_fabricated_runs():
    runs = fake_runs({"frame": {0: (2.0, 0.60), 1: (2.2, 0.70)}, "random": {0: (2.5, 0.55), 1: (2.4, 0.58)}})
    table = {(r["metric"], r["schedule"]): r for r in build_table(runs, ["frame", "random"])}
    assert set(table) == {(m, s) for m in ("heldout_loss/all", "heldout_bpb/all", "piqa/acc") for s in ("frame", "random")}
    row = table["heldout_loss/all", "frame"]
    assert row["mean"] == pytest.approx(2.1) and row["stderr"] == pytest.approx(0.1) and row["n_seeds"] == 2
    assert row["diff_vs_random"] == pytest.approx(-0.35)  # paired: (2.0-2.5, 2.2-2.4) -> mean -0.35
    assert row["diff_stderr"] == pytest.approx(np.std([-0.5, -0.2], ddof=1) / math.sqrt(2))
    assert row["item_stderr"] is None
    acc = table["piqa/acc", "frame"]
    assert acc["mean"] == pytest.approx(0.65) and acc["item_stderr"] == pytest.approx(0.05)
    assert table["piqa/acc", "random"]["diff_vs_random"] is None  # the baseline has no difference to itself


def test_one_seed_reports_null_stderr_and_text_and_csv():
    runs = fake_runs({"frame": {0: (2.0, 0.6)}, "random": {0: (2.5, 0.5)}})
    table = build_table(runs, ["frame", "random"])
    frame_loss = next(r for r in table if r["metric"] == "heldout_loss/all" and r["schedule"] == "frame")
    assert frame_loss["stderr"] is None and frame_loss["diff_stderr"] is None
    assert frame_loss["diff_vs_random"] == pytest.approx(-0.5)
    text = format_table(table)
    assert "heldout_loss/all" in text and "-0.5000" in text and "± 0.0000" not in text
    rows = list(csv.DictReader(io.StringIO(table_csv(table))))
    assert len(rows) == len(table) and rows[0]["stderr"] == ""


def test_unequal_token_budgets_are_refused(tmp_path):
    runs = fake_runs({"frame": {0: (2.0, 0.6)}, "random": {0: (2.5, 0.5)}})
    runs[0]["tokens"] = 999
    with pytest.raises(FramelmError, match="different token counts"):
        check_same_budget(runs, RunDir(tmp_path / "run"))


def test_same_settings_are_required_up_to_execution_details(tmp_path):
    run = RunDir(tmp_path / "run")
    runs = fake_runs({"frame": {0: (2.0, 0.6)}, "random": {0: (2.5, 0.5)}})

    def record(schedule: str, **changes) -> None:
        config = TrainConfig(schedule=schedule, **changes).to_dict()
        run.update_record(f"train/{schedule}/seed0", {"status": "done", "hash": schedule, "config": config})

    record("frame", device="cpu")
    record("random", device="cuda")  # an execution detail: not a difference in training
    check_same_budget(runs, run)
    record("random", lr=1e-4)
    with pytest.raises(FramelmError, match="differ in training settings"):
        check_same_budget(runs, run)


def test_config_checks_and_per_run_configs():
    with pytest.raises(ConfigError, match="seeds"):
        CompareConfig.from_dict({"seeds": [1, 1]})
    cfg = CompareConfig.from_dict({"schedules": ["frame", "random"], "seeds": [0, 3], "train": {"lr": 1e-3},
                                   "eval": {"tasks": [], "name": "ignored"}})
    runs = cfg.runs()
    assert [(t.schedule, t.seed, e.model, e.instance()) for t, e in runs] == [
        ("frame", 0, "train/frame/seed0", "frame/seed0"), ("frame", 3, "train/frame/seed3", "frame/seed3"),
        ("random", 0, "train/random/seed0", "random/seed0"), ("random", 3, "train/random/seed3", "random/seed3")]
    assert all(t.lr == 1e-3 for t, _ in runs)
    assert all(e.seq_len == t.seq_len for t, e in runs)  # held-out windows as long as training rows


# -- a real comparison: two schedules over the same documents -------------------------------------

def add_random_schedule(root) -> None:
    """Export a 'random' stream holding the frame stream's documents in shuffled order, and
    order.parquet files naming each schedule's documents."""
    frame_dir = root / "export" / "frame" / "stream"
    meta = json.loads((frame_dir / "meta.json").read_text())
    stream = np.fromfile(frame_dir / "tokens.bin", dtype=meta["dtype"])
    ends = np.flatnonzero(stream == meta["eos_id"]) + 1
    docs = np.split(stream, ends[:-1])
    index = pq.read_table(root / "tokenize" / "index.parquet").to_pylist()
    train = [r for r in index if r["split"] == "train"]
    frame_ids = [r["id"] for r in train if r["source"] == "alpha"] + [r["id"] for r in train if r["source"] == "beta"]
    assert len(frame_ids) == len(docs)
    order = np.random.default_rng(1).permutation(len(docs))
    out = root / "export" / "random" / "stream"
    out.mkdir(parents=True)
    np.concatenate([docs[i] for i in order]).tofile(out / "tokens.bin")
    (out / "meta.json").write_text(json.dumps({**meta, "stages": [{"name": "random", "start_token": 0,
                                                                    "end_token": len(stream)}]}))
    for name, ids in (("frame", frame_ids), ("random", [frame_ids[i] for i in order])):
        (root / "schedule" / name).mkdir(parents=True)
        pq.write_table(pa.table({"position": np.arange(len(ids)), "id": ids}), root / "schedule" / name / "order.parquet")


@pytest.mark.slow
def test_compare_trains_both_schedules_on_the_same_tokens(tmp_path):
    root = make_tiny_run(tmp_path / "run", tokenizer=True)
    add_random_schedule(root)
    run = RunDir(root)
    train = TrainConfig(seq_len=32, global_batch_seqs=4, max_tokens=1280, eval_every_steps=0,
                        checkpoint_every_steps=10, heldout_max_tokens_per_set=2000, device="cpu")
    cfg = CompareConfig(train=train, eval=EvalConfig(tasks=[], heldout_tokens=2000, device="cpu"))
    counts = run_stage("compare", cfg, run)

    results = json.loads(run.path("compare", "results.json").read_text())
    assert [(r["schedule"], r["seed"], r["tokens"]) for r in results["runs"]] == [("frame", 0, 1280), ("random", 0, 1280)]
    assert results["same_documents"] is True and counts["same_documents"] is True
    for r in results["runs"]:
        log = [json.loads(line) for line in run.path(r["train_key"], "log.jsonl").read_text().splitlines()]
        assert max(rec["tokens"] for rec in log if rec["type"] == "train") == 1280
        # eval's held-out loss on the exported HF model (windows of train.seq_len by default)
        # equals the trainer's own final measurement
        trainer_final = [rec for rec in log if rec["type"] == "heldout"][-1]["losses"]
        for name, loss in trainer_final.items():
            assert r["results"]["heldout"][name]["loss"] == pytest.approx(loss, rel=1e-4)
    table = {(row["metric"], row["schedule"]): row for row in results["table"]}
    frame, random = table["heldout_loss/all", "frame"], table["heldout_loss/all", "random"]
    assert frame["stderr"] is None and frame["n_seeds"] == 1
    assert frame["diff_vs_random"] == pytest.approx(frame["mean"] - random["mean"])
    assert frame["mean"] != random["mean"]  # same documents, different order: different models
    assert "heldout_loss/source/alpha" in counts["summary"]
    assert run.path("compare", "results.csv").read_text().startswith("metric,schedule,mean,stderr")
    assert run_stage("compare", cfg, run) == counts  # everything up to date: nothing re-runs
