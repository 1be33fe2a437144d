"""framelm.compare: the statistics by hand, and a real train + eval comparison on a tiny run."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import replace as dataclasses_replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.compare import (TABLE_COLUMNS, CompareConfig, Difference, build_table, check_budgets, check_same_budget, difference,
                             documents_digest, format_table, heldout_notes, heldout_sizes, mean_stderr,
                             non_finite_note, non_finite_values, shared_fraction, t_test_p,
                             table_csv, trained_documents, trained_tokens, unigram_note)
from framelm.config import ConfigError
from framelm.errors import FramelmError
from framelm.evaluate import EvalConfig, resolve_model
from framelm.pipeline import run_stage, stage_hash
from framelm.rundir import RunDir
from framelm.tokenstore import StageRange
from framelm.train import TrainConfig
from framelm.train.data import IGNORE, BatchPlan

from train.tiny_run import make_tiny_run


def fake_results(loss: float, acc: float, acc_stderr: float = 0.05) -> dict:
    return {"model": "m", "heldout": {"all": {"loss": loss, "bpb": loss / math.log(2), "tokens": 100}},
            "tasks": {"piqa": {"acc": acc, "acc_stderr": acc_stderr, "acc_norm": None, "n": 50}}}


def fake_runs(values: dict[str, dict[int, tuple[float, float]]], weights: str = "final") -> list[dict]:
    return [{"schedule": s, "weights": weights, "seed": seed, "train_key": f"train/{s}/seed{seed}",
             "eval_key": f"eval/{s}/seed{seed}", "tokens": 1000, "results": fake_results(*v)}
            for s, per_seed in values.items() for seed, v in per_seed.items()]


def cauchy_p(t: float) -> float:
    """Two-sided p-value of a t test with 1 degree of freedom (the t distribution is Cauchy's)."""
    return 1 - 2 / math.pi * math.atan(abs(t))


def test_mean_stderr_by_hand():
    mean, se = mean_stderr([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    # sample variance: ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = 7/3; se = sqrt(7/3 / 3)
    assert se == pytest.approx(math.sqrt(7 / 9))
    assert mean_stderr([3.0]) == (3.0, None)  # one seed: unknown, not zero


def test_difference_paired_by_seed_and_unpaired():
    frame, random = {0: 2.0, 1: 3.0, 2: 7.0}, {0: 1.0, 1: 1.5, 2: 4.0}
    diff, se, df, paired = difference(frame, random)
    d = np.array([1.0, 1.5, 3.0])  # paired differences
    assert diff == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    assert df == 2 and paired is True  # a paired t test over 3 seeds has 2 degrees of freedom
    diff, se, df, paired = difference({0: 2.0, 1: 4.0}, {5: 1.0, 6: 2.0, 7: 6.0})  # no common seeds: unpaired
    assert diff == pytest.approx(3.0 - 3.0) and paired is False
    v, vb = 2.0 / 2, 7.0 / 3  # squared standard errors: sample variances 2 (2 seeds) and 7 (3 seeds)
    assert se == pytest.approx(math.sqrt(v + vb))
    assert df == pytest.approx((v + vb) ** 2 / (v ** 2 / 1 + vb ** 2 / 2))  # Welch-Satterthwaite, ~2.9
    assert difference({0: 2.0}, {0: 1.0}) == (1.0, None, None, True)
    assert difference({0: 2.0, 1: 2.0}, {5: 1.0, 6: 1.0}) == (1.0, 0.0, None, False)  # no spread: 0 / 0 df


def test_t_test_p_by_hand():
    assert t_test_p(Difference(0.03, 0.01, 1, True)) == pytest.approx(cauchy_p(3.0))  # 0.205: 3 SE is not enough
    assert t_test_p(Difference(-0.03, 0.01, 1, True)) == pytest.approx(cauchy_p(3.0))  # two-sided
    # a large sample: the t test tends to the normal one, 1.96 standard errors -> p = 0.05
    assert t_test_p(Difference(1.96, 1.0, 10_000, False)) == pytest.approx(0.05, abs=1e-3)
    for undefined in (Difference(1.0, None, None, True), Difference(1.0, 0.0, 3, True), Difference(None, None, None, None)):
        assert t_test_p(undefined) is None


def test_table_from_fabricated_runs():
    runs = fake_runs({"frame": {0: (2.0, 0.60), 1: (2.2, 0.70)}, "random": {0: (2.5, 0.55), 1: (2.4, 0.58)}})
    table = {(r["metric"], r["schedule"]): r for r in build_table(runs, ["frame", "random"])}
    assert set(table) == {(m, s) for m in ("heldout_loss/all", "heldout_bpb/all", "piqa/acc") for s in ("frame", "random")}
    row = table["heldout_loss/all", "frame"]
    assert row["mean"] == pytest.approx(2.1) and row["stderr"] == pytest.approx(0.1) and row["n_seeds"] == 2
    assert row["diff_vs_random"] == pytest.approx(-0.35)  # paired: (2.0-2.5, 2.2-2.4) -> mean -0.35
    assert row["diff_stderr"] == pytest.approx(np.std([-0.5, -0.2], ddof=1) / math.sqrt(2))
    assert row["diff_paired"] is True and row["diff_df"] == 1
    assert row["diff_p"] == pytest.approx(cauchy_p(row["diff_vs_random"] / row["diff_stderr"]))
    assert row["item_stderr"] is None and row["weights"] == "final"
    acc = table["piqa/acc", "frame"]
    assert acc["mean"] == pytest.approx(0.65) and acc["item_stderr"] == pytest.approx(0.05)
    baseline = table["piqa/acc", "random"]  # the baseline has no difference to itself
    assert baseline["diff_vs_random"] is None and baseline["diff_p"] is None and baseline["diff_df"] is None


def test_averaged_weights_are_compared_with_random_averaged_the_same_way():
    final = fake_runs({"frame": {0: (2.0, 0.6), 1: (2.2, 0.6)}, "random": {0: (2.5, 0.5), 1: (2.4, 0.5)}})
    averaged = fake_runs({"frame": {0: (1.9, 0.6), 1: (2.0, 0.6)}, "random": {0: (1.8, 0.5), 1: (1.9, 0.5)}}, "ema")
    table = {(r["metric"], r["schedule"], r["weights"]): r for r in build_table(final + averaged, ["frame", "random"])}
    assert table["heldout_loss/all", "frame", "final"]["diff_vs_random"] == pytest.approx(-0.35)
    # frame+ema - random+ema, not frame+ema - random
    assert table["heldout_loss/all", "frame", "ema"]["diff_vs_random"] == pytest.approx(0.1)
    assert table["heldout_loss/all", "random", "ema"]["mean"] == pytest.approx(1.85)
    text = format_table(list(table.values()))
    assert "frame+ema" in text and "random+ema" in text


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
    assert tuple(rows[0]) == TABLE_COLUMNS and rows[0]["diff_p"] == "" and rows[0]["weights"] == "final"


def test_a_non_finite_value_makes_its_rows_not_comparable():
    runs = fake_runs({"frame": {0: (2.0, 0.6), 1: (float("nan"), 0.7)}, "random": {0: (2.5, 0.5), 1: (2.4, 0.5)},
                      "curric": {0: (2.1, 0.6), 1: (2.3, 0.6)}})
    table = build_table(runs, ["frame", "curric", "random"])
    rows = {(r["metric"], r["schedule"]): r for r in table}
    for metric in ("heldout_loss/all", "heldout_bpb/all"):  # frame seed 1 diverged: NaN loss and bits per byte
        diverged = rows[metric, "frame"]
        assert [diverged[k] for k in ("mean", "stderr", "item_stderr", "diff_vs_random", "diff_stderr", "diff_p")] == [None] * 6
        assert diverged["n_seeds"] == 2
        assert rows[metric, "curric"]["diff_p"] is not None  # the other schedules are still compared
    assert rows["piqa/acc", "frame"]["diff_vs_random"] == pytest.approx(0.15)  # its accuracies are finite
    text = json.dumps(table, allow_nan=False)  # no NaN reaches results.json's table
    assert "NaN" not in text and "nan" not in format_table(table)

    found = non_finite_values(runs)
    assert found == [{"eval_key": "eval/frame/seed1", "schedule": "frame", "weights": "final", "seed": 1,
                      "metric": m, "value": "nan"} for m in ("heldout_loss/all", "heldout_bpb/all")]
    note = non_finite_note({"non_finite": found})
    assert note.startswith("caution: not comparable: non-finite results (a diverged run?) in eval/frame/seed1: "
                           "heldout_loss/all = nan, heldout_bpb/all = nan; ")
    assert non_finite_note({"non_finite": []}) is None

    runs[3]["results"]["heldout"]["all"]["loss"] = float("inf")  # the baseline's seed 1: no schedule has a difference
    rows = {(r["metric"], r["schedule"]): r for r in build_table(runs, ["frame", "curric", "random"])}
    assert rows["heldout_loss/all", "random"]["mean"] is None
    assert rows["heldout_loss/all", "curric"]["mean"] == pytest.approx(2.2)
    assert rows["heldout_loss/all", "curric"]["diff_vs_random"] is None and rows["heldout_loss/all", "curric"]["diff_p"] is None


def test_unequal_token_budgets_are_refused(tmp_path):
    runs = fake_runs({"frame": {0: (2.0, 0.6)}, "random": {0: (2.5, 0.5)}})
    runs[0]["tokens"] = 999
    with pytest.raises(FramelmError, match="different token counts"):
        check_same_budget(runs, RunDir(tmp_path / "run"))


def export_prefix(root, schedule: str, n_tokens: int) -> None:
    """Export stream `schedule`: the first n_tokens of the frame stream, as one stage."""
    frame_dir = root / "export" / "frame" / "stream"
    meta = json.loads((frame_dir / "meta.json").read_text())
    out = root / "export" / schedule / "stream"
    out.mkdir(parents=True)
    np.fromfile(frame_dir / "tokens.bin", dtype=meta["dtype"])[:n_tokens].tofile(out / "tokens.bin")
    (out / "meta.json").write_text(json.dumps({**meta, "n_tokens": n_tokens,
                                               "stages": [{"name": schedule, "start_token": 0, "end_token": n_tokens}]}))


def test_streams_that_give_different_steps_are_refused_before_anything_trains(tmp_path):
    run = RunDir(make_tiny_run(tmp_path / "run"))
    frame_tokens = json.loads(run.path("export", "frame", "stream", "meta.json").read_text())["n_tokens"]
    export_prefix(run.root, "short", 1000)  # steps of 4 x 32 = 128 tokens: 7 whole steps, 896 tokens
    cfg = CompareConfig(schedules=["frame", "short"], train=TrainConfig(seq_len=32, global_batch_seqs=4, device="cpu"))
    with pytest.raises(FramelmError, match=rf"different token counts \(frame {frame_tokens // 128 * 128:,}, short 896\): "
                                           rf"their streams hold frame {frame_tokens:,}, short 1,000 tokens and a step takes 128; "
                                           r"set compare.train.max_tokens = 896 \(the shortest stream's whole steps\)"):
        run_stage("compare", cfg, run)
    assert not run.path("train").exists()  # refused before the first training, not after the last
    check_budgets(dataclasses_replace(cfg, train=dataclasses_replace(cfg.train, max_tokens=896)), run)
    check_budgets(dataclasses_replace(cfg, train=dataclasses_replace(cfg.train, max_tokens=900)), run)  # 7 steps each
    with pytest.raises(FramelmError, match=r"train.max_tokens = 1,001 exceeds the exported stream of 'short'.*= 896"):
        check_budgets(dataclasses_replace(cfg, train=dataclasses_replace(cfg.train, max_tokens=1001)), run)
    with pytest.raises(FramelmError, match=r"compare.schedules names 'nope', which has no exported stream .*\(exported: "
                                           r"frame, short\); export it first: framelm export --run-dir"):
        check_budgets(dataclasses_replace(cfg, schedules=["frame", "nope"]), run)
    run.update_record("train/nope/seed0", {"stage": "train", "status": "done"})  # trained, then its export deleted
    check_budgets(dataclasses_replace(cfg, schedules=["frame", "nope"]), run)


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
    assert [(t.schedule, t.seed, e.model, e.instance()) for t, (e,) in runs] == [
        ("frame", 0, "train/frame/seed0", "frame/seed0"), ("frame", 3, "train/frame/seed3", "frame/seed3"),
        ("random", 0, "train/random/seed0", "random/seed0"), ("random", 3, "train/random/seed3", "random/seed3")]
    assert all(t.lr == 1e-3 for t, _ in runs)
    assert all(e.seq_len == t.seq_len for t, (e,) in runs)  # held-out windows as long as training rows


def test_averaged_checkpoints_are_evaluated_too(tmp_path):
    cfg = CompareConfig.from_dict({"seeds": [0], "train": {"average": "ema"}, "eval": {"tasks": []}})
    [(train, frame_evals), (_, random_evals)] = cfg.runs()
    assert [(e.model, e.instance(), e.averaged, e.upstream()) for e in frame_evals] == [
        ("train/frame/seed0", "frame/seed0", False, ("train/frame/seed0", "tokenize")),
        ("train/frame/seed0/hf-avg", "frame/seed0-avg", True, ("train/frame/seed0", "tokenize"))]
    assert [e.instance() for e in random_evals] == ["random/seed0", "random/seed0-avg"]
    assert [len(evals) for _, evals in CompareConfig(eval=EvalConfig(tasks=[])).runs()] == [1, 1]  # no average

    run = RunDir(tmp_path / "run")
    final, averaged = frame_evals
    with pytest.raises(FramelmError, match="seed0/hf-avg is not a Hugging Face model folder.*train.average"):
        resolve_model(averaged, run)
    for folder in ("hf", "hf-avg"):
        d = run.path("train", "frame", "seed0", folder)
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
    assert resolve_model(final, run) == run.path("train", "frame", "seed0", "hf")
    assert resolve_model(averaged, run) == run.path("train", "frame", "seed0", "hf-avg")
    assert EvalConfig(model="train/frame/seed0/other").train_key is None  # any other sub-folder is a plain path


def test_a_replaced_train_record_makes_compare_rerun(tmp_path):
    """A standalone `framelm train` that replaces train/frame/seed0 with another config changes
    compare's hash, so compare does not call itself up to date on results of the old model."""
    run = RunDir(tmp_path / "run")
    cfg = CompareConfig(eval=EvalConfig(tasks=[]))
    assert cfg.input_fingerprint(run) == {}  # nothing run yet: compare's first hash is its steady one
    for name, c in cfg.owned_stages():  # what compare's own runs leave in the manifest
        key = f"{name}/{c.instance()}"
        run.update_record(key, {"stage": name, "status": "done", "hash": stage_hash(name, c, run, dry_run=True)[0]})
    assert cfg.input_fingerprint(run) == {}
    h = stage_hash("compare", cfg, run, dry_run=True)[0]
    run.update_record("compare", {"stage": "compare", "status": "done", "hash": h})
    assert stage_hash("compare", cfg, run, dry_run=True)[0] == h  # up to date

    other = TrainConfig(schedule="frame", seed=0, lr=1e-2)  # framelm train --schedule frame --train.lr 0.01
    run.update_record("train/frame/seed0", {"stage": "train", "status": "done",
                                            "hash": stage_hash("train", other, run, dry_run=True)[0]})
    stale = cfg.input_fingerprint(run)
    assert "train/frame/seed0" in stale and "train/random/seed0" not in stale
    assert stage_hash("compare", cfg, run, dry_run=True)[0] != h  # compare re-runs (and re-trains frame)


def test_heldout_sizes_and_small_set_caution():
    runs = fake_runs({"frame": {0: (3.0, 0.5)}, "random": {0: (3.1, 0.5)}})
    for r in runs:
        r["results"]["heldout"]["all"].update(docs=2, tokens=96)
        r["results"]["heldout"]["quadrant/Q1"] = {"loss": 3.0, "docs": 400, "tokens": 80_000}
        r["results"]["heldout"]["source/wiki"] = {"loss": 3.0, "docs": 1, "tokens": 25_000}
    sizes = heldout_sizes(runs)
    assert sizes == {"all": {"docs": 2, "tokens": 96}, "quadrant/Q1": {"docs": 400, "tokens": 80_000},
                     "source/wiki": {"docs": 1, "tokens": 25_000}}
    results = {"heldout_sets": sizes, "quadrants_without_heldout": ["Q2", "Q3"]}
    notes = heldout_notes(results)
    assert notes[0] == ("caution: held-out set below 50 documents or 20,000 tokens, too small a sample to rank "
                        "schedules on: 'all' (2 documents, 96 tokens)")
    assert heldout_notes(results, None)[0].endswith("'all' (2 documents, 96 tokens), 'source/wiki' (1 document, 25,000 tokens)")
    assert notes[1] == "quadrants without a held-out set (no held-out loss for them in the table): Q2, Q3"
    assert len(notes) == 2  # Q1 is large enough
    assert heldout_notes(results, "heldout_loss/quadrant/Q1") == notes[1:]
    assert heldout_notes(results, "piqa/acc") == notes[1:]  # a task's accuracy reads no held-out set
    assert heldout_notes({"heldout_sets": {"all": {"docs": 500, "tokens": 200_000}}, "quadrants_without_heldout": []}) == []


def test_unigram_note_cautions_only_when_the_models_are_near_the_floor():
    table = build_table(fake_runs({"frame": {0: (4.0, 0.5)}, "random": {0: (4.2, 0.5)}}), ["frame", "random"])
    near = unigram_note({"unigram_heldout_loss": {"all": 4.3}, "table": table})
    assert near.startswith("caution: a unigram model of the training documents' tokens has held-out loss 4.300 nats on "
                           "'all'; the best schedule 4.000, 0.300 nats below it: the models have learned little")
    far = unigram_note({"unigram_heldout_loss": {"all": 6.0}, "table": table})
    assert far.endswith("the best schedule 4.000, 2.000 nats below it")
    worse = unigram_note({"unigram_heldout_loss": {"all": 3.9}, "table": table})
    assert "the best schedule 4.000, 0.100 nats above it, worse than token frequencies alone: " in worse
    assert unigram_note({"unigram_heldout_loss": None, "table": table}) is None  # eval measured no held-out loss
    assert unigram_note({"table": table}) is None  # a results.json written before the floor existed


# -- which documents a run trained on -------------------------------------------------------------

def write_order(run: RunDir, schedule: str, ids: list[str], n_tokens: list[int]) -> None:
    d = run.path("schedule", schedule)
    d.mkdir(parents=True)
    pq.write_table(pa.table({"position": np.arange(len(ids)), "id": ids, "n_tokens": n_tokens}), d / "order.parquet")


def test_documents_are_those_of_the_trained_prefix(tmp_path):
    run = RunDir(tmp_path / "run")
    ids = [f"d{i}" for i in range(8)]
    write_order(run, "frame", ids, [63] * 8)  # 64 stream tokens each, with its EOS
    write_order(run, "random", [ids[i] for i in (5, 0, 7, 2, 1, 3, 6, 4)], [63] * 8)
    # 256 tokens read stream tokens [0, 257): four whole documents and the first token of a fifth
    frame, random = (trained_documents(run, s, 256) for s in ("frame", "random"))
    assert frame.to_pylist() == ["d0", "d1", "d2", "d3", "d4"] and random.to_pylist() == ["d0", "d1", "d2", "d5", "d7"]
    assert documents_digest(frame) != documents_digest(random) and shared_fraction(frame, random) == 3 / 5
    assert len(trained_documents(run, "frame", 255)) == 4
    full = [trained_documents(run, s, 8 * 64) for s in ("frame", "random")]
    assert documents_digest(full[0]) == documents_digest(full[1]) and len(full[0]) == 8  # same documents, other order
    assert shared_fraction(full[0], full[1]) == 1.0
    assert trained_documents(run, "nothing", 256) is None


def test_shared_fraction_counts_repeats():
    import pyarrow as pa

    assert shared_fraction(pa.array(["a", "a", "b"]), pa.array(["a", "b", "b", "c"])) == 2 / 4


def test_documents_match_what_the_trainer_reads(tmp_path):
    """Cross-check against framelm.train.data.BatchPlan, shuffle window included: the documents
    with a token among the inputs or targets of every step are those trained_documents counts."""
    rng = np.random.default_rng(3)
    run = RunDir(tmp_path / "run")
    lengths = rng.integers(1, 40, 50).tolist()
    write_order(run, "frame", [f"d{i}" for i in range(50)], lengths)
    doc_of_token = np.concatenate([np.full(n + 1, i) for i, n in enumerate(lengths)])  # document of each stream token
    tokens = np.arange(len(doc_of_token))  # token value = stream index, so a batch says what it read
    stages = [StageRange("a", 0, 400), StageRange("b", 400, len(tokens))]
    for max_tokens in (320, 640, 0):
        plan = BatchPlan(tokens, stages, seq_len=16, global_batch_seqs=4, max_tokens=max_tokens,
                         shuffle_window_seqs=3, seed=1)
        seen = set()
        for step in range(plan.n_steps):
            inputs, targets = plan.rows(step, 0, plan.rows_per_step)
            read = np.concatenate([inputs.ravel(), targets[targets != IGNORE]])
            seen |= set(doc_of_token[read].tolist())
        trained = plan.n_steps * plan.tokens_per_step
        assert trained_documents(run, "frame", trained).to_pylist() == sorted(f"d{i}" for i in seen)
        assert seen == set(range(max(seen) + 1))  # a prefix of the stream


def test_trained_tokens_skips_an_unfinished_last_log_line(tmp_path):
    run = RunDir(tmp_path / "run")
    log = run.path("train", "frame", "seed0", "log.jsonl")
    log.parent.mkdir(parents=True)
    records = ['{"type": "train", "step": 1, "tokens": 128, "loss": 5.0}',
               '{"type": "heldout", "step": 1, "tokens": 128, "losses": {"all": 5.1}}',
               '{"type": "train", "step": 2, "tokens": 256, "loss": 4.0}']
    log.write_text("\n".join(records) + "\n" + '{"type": "train", "step": 3, "tok')  # killed mid-write
    assert trained_tokens(run, "train/frame/seed0", {}) == 256
    assert trained_tokens(run, "train/frame/seed0", {"tokens": 384}) == 384  # the record's count comes first
    log.write_text("\n".join(records[:1] + ['{"type": "train", "step": 2, "tok'] + records[2:]) + "\n")
    with pytest.raises(FramelmError, match=r"seed0/log\.jsonl: line 2: invalid JSON"):
        trained_tokens(run, "train/frame/seed0", {})
    log.write_text(records[0] + "\n" + '{"type": "train", "step": 2, "tok')  # the unfinished line ends no newline
    assert trained_tokens(run, "train/frame/seed0", {}) == 128
    log.write_text('{"type": "train", "step": 2, "tokens": "256"}\n')
    with pytest.raises(FramelmError, match=r"log\.jsonl: line 1: field 'tokens' must be an integer, got '256'"):
        trained_tokens(run, "train/frame/seed0", {})


def test_order_without_token_counts_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path("schedule", "frame").mkdir(parents=True)
    pq.write_table(pa.table({"position": [0], "id": ["a"]}), run.path("schedule", "frame", "order.parquet"))
    with pytest.raises(FramelmError, match=r"order\.parquet: missing column\(s\) n_tokens"):
        trained_documents(run, "frame", 10)


# -- a real comparison: two schedules over the same documents -------------------------------------

def add_random_schedule(root) -> dict[str, list[tuple[str, int]]]:
    """Export a 'random' stream holding the frame stream's documents in shuffled order, and
    order.parquet files naming each schedule's documents. Returns each stream's (id, first
    token) per document, read from the exported streams themselves."""
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
    starts = {}
    for name, doc_order in (("frame", np.arange(len(docs))), ("random", order)):
        ids, n_tokens = [frame_ids[i] for i in doc_order], [len(docs[i]) - 1 for i in doc_order]
        (root / "schedule" / name).mkdir(parents=True)
        pq.write_table(pa.table({"position": np.arange(len(ids)), "id": ids, "n_tokens": n_tokens}),
                       root / "schedule" / name / "order.parquet")
        starts[name] = list(zip(ids, np.cumsum([0] + [len(docs[i]) for i in doc_order[:-1]]).tolist()))
    run = RunDir(root)
    record = run.record("export")
    record["counts"]["parts"]["random"] = "synthetic-stream-random"
    run.update_record("export", record)
    return starts


def documents_read(starts: list[tuple[str, int]], tokens: int) -> set[str]:
    """The documents of a stream the trainer reads with `tokens` training tokens: stream tokens [0, tokens + 1)."""
    return {doc for doc, first in starts if first <= tokens}


@pytest.mark.slow
def test_compare_trains_both_schedules_on_the_same_tokens(tmp_path, capsys):
    root = make_tiny_run(tmp_path / "run", tokenizer=True)
    starts = add_random_schedule(root)
    run = RunDir(root)
    train = TrainConfig(seq_len=32, global_batch_seqs=4, max_tokens=1280, eval_every_steps=0,
                        checkpoint_every_steps=10, heldout_max_tokens_per_set=2000, device="cpu")
    cfg = CompareConfig(train=train, eval=EvalConfig(tasks=[], heldout_tokens=2000, device="cpu"))
    counts = run_stage("compare", cfg, run)

    results = json.loads(run.path("compare", "results.json").read_text())
    assert [(r["schedule"], r["seed"], r["tokens"]) for r in results["runs"]] == [("frame", 0, 1280), ("random", 0, 1280)]
    # 1280 of ~5,500 tokens: frame's prefix is its first stage (alpha documents only), random's a
    # mix, so the two runs did not see the same documents
    frame_docs, random_docs = documents_read(starts["frame"], 1280), documents_read(starts["random"], 1280)
    assert frame_docs != random_docs
    assert results["same_documents"] is False and counts["same_documents"] is False
    assert 0 < results["shared_documents"]["frame"] < 1
    assert [r["n_documents"] for r in results["runs"]] == [len(frame_docs), len(random_docs)]
    assert "the schedules trained on different documents" in counts["summary"]
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
    assert frame["mean"] != random["mean"]  # different models
    assert "heldout_loss/source/alpha" in counts["summary"]
    assert set(results["heldout_sets"]) == set(results["runs"][0]["results"]["heldout"])
    assert all(isinstance(v["docs"], int) and isinstance(v["tokens"], int) for v in results["heldout_sets"].values())
    assert "held-out set" in counts["summary"]
    # the unigram floor of every held-out set eval measured; the Markov chains are learnt well below it
    assert set(results["unigram_heldout_loss"]) == set(results["heldout_sets"])
    floor, best = results["unigram_heldout_loss"]["all"], min(frame["mean"], random["mean"])
    assert f"has held-out loss {floor:.3f} nats on 'all'; the best schedule {best:.3f}" in counts["summary"]
    assert floor - best > 0.5 and "caution: a unigram model" not in counts["summary"]
    assert run.path("compare", "results.csv").read_text().startswith(",".join(TABLE_COLUMNS) + "\n")
    assert run_stage("compare", cfg, run) == counts  # everything up to date: nothing re-runs

    capsys.readouterr()
    run_stage("compare", cfg, run, dry_run=True)
    listed = capsys.readouterr().out
    assert "# compare: up to date (would skip)" in listed
    for key in ("train/frame/seed0", "eval/frame/seed0", "train/random/seed0", "eval/random/seed0"):
        assert f"#   {key}: up to date (would skip)" in listed
    run_stage("compare", cfg, run, force=True, dry_run=True)
    assert capsys.readouterr().out.count(": would run") == 5  # compare and each of its runs
    started = {key: run.record(key)["started"] for key in ("train/frame/seed0", "eval/random/seed0")}
    assert run_stage("compare", cfg, run, force=True)["summary"] == counts["summary"]  # CPU training is exact
    assert all(run.record(key)["started"] > t for key, t in started.items())  # retrained and re-evaluated


@pytest.mark.slow
def test_compare_on_full_streams_evaluates_the_averaged_checkpoints_too(tmp_path):
    root = make_tiny_run(tmp_path / "run", tokenizer=True)
    starts = add_random_schedule(root)
    run = RunDir(root)
    # the whole streams (5,477 tokens): 57 steps of 96 tokens stop 4 tokens short of the end, inside
    # each stream's last document, so every document is trained on (asserted below)
    train = TrainConfig(seq_len=32, global_batch_seqs=3, max_tokens=0, eval_every_steps=0, checkpoint_every_steps=20,
                        average="ema", average_last=3, heldout_max_tokens_per_set=2000, device="cpu")
    cfg = CompareConfig(train=train, eval=EvalConfig(tasks=[], heldout_tokens=2000, device="cpu"))
    counts = run_stage("compare", cfg, run)

    results = json.loads(run.path("compare", "results.json").read_text())
    tokens = results["runs"][0]["tokens"]
    assert documents_read(starts["frame"], tokens) == documents_read(starts["random"], tokens) == {d for d, _ in starts["frame"]}
    assert results["same_documents"] is True and counts["same_documents"] is True
    assert results["shared_documents"] == {"frame": 1.0}
    assert {r["n_documents"] for r in results["runs"]} == {len(starts["frame"])}
    assert [(r["schedule"], r["weights"], r["eval_key"]) for r in results["runs"]] == [
        ("frame", "final", "eval/frame/seed0"), ("frame", "ema", "eval/frame/seed0-avg"),
        ("random", "final", "eval/random/seed0"), ("random", "ema", "eval/random/seed0-avg")]
    assert counts["runs"] == 2 and counts["evaluations"] == 4
    final, averaged = results["runs"][0]["results"], results["runs"][1]["results"]
    assert averaged["model"].endswith("seed0/hf-avg") and final["model"].endswith("seed0/hf")
    assert averaged["heldout"]["all"]["loss"] != final["heldout"]["all"]["loss"]
    table = {(row["metric"], row["schedule"], row["weights"]): row for row in results["table"]}
    frame_ema, random_ema = table["heldout_loss/all", "frame", "ema"], table["heldout_loss/all", "random", "ema"]
    assert frame_ema["diff_vs_random"] == pytest.approx(frame_ema["mean"] - random_ema["mean"])
    assert "frame+ema" in counts["summary"] and "random+ema" in counts["summary"]
