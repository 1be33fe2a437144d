import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framelm.cli import main
from framelm.errors import ConfigError, FramelmError
from framelm.labels import read_labelled
from framelm.partition import PartitionConfig, cell_name, partition_documents
from framelm.rundir import RunDir
from scores_fixtures import write_scores


def labels(run: RunDir) -> dict[str, str]:
    t = read_labelled(run, ["id"])
    return dict(zip(t.column("id").to_pylist(), t.column("quadrant").to_pylist()))


def summary(run: RunDir) -> dict:
    return json.loads(run.path("partition/summary.json").read_text())


def cells(run: RunDir) -> dict[str, dict]:
    return {c["name"]: c for c in summary(run)["cells"]}


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path / "run")


def test_nested_medians_give_frame_quadrants(run):
    # ppl 1..16; inside each PPL half the PD order is reversed, so nested and independent differ.
    ppl = list(range(1, 17))
    pd = [16 - i for i in range(16)]
    write_scores(run, {"ppl": ppl, "pd": pd})
    counts = partition_documents(PartitionConfig(), run)
    got = labels(run)
    # low PPL half: d0..d7 (ppl 1..8), pd 16..9 -> d4..d7 low PD (Q1), d0..d3 high PD (Q2)
    assert [got[f"d{i:04d}"] for i in range(16)] == ["Q2"] * 4 + ["Q1"] * 4 + ["Q4"] * 4 + ["Q3"] * 4
    assert {n: c["docs"] for n, c in cells(run).items()} == {"Q1": 4, "Q2": 4, "Q3": 4, "Q4": 4}
    s = summary(run)
    ppl_cut = [c for c in s["cut_points"] if c["axis"] == "ppl"]
    assert ppl_cut[0]["cuts"] == [8.5]
    assert sorted(c["ppl_bin"] for c in s["cut_points"] if c["axis"] == "pd") == [0, 1]
    assert counts["labelled"] == 16 and counts["excluded"] == 0
    assert "Q3" in counts["summary"] and "labelled 16 of 16" in counts["summary"]


def test_bins_and_names_match_the_contract(run):
    write_scores(run, {"ppl": [1, 2, 3, 4], "pd": [1, 2, 3, 4]})
    partition_documents(PartitionConfig(split="independent"), run)
    # The label file: one nullable string column lined up with scores.parquet, nothing copied from it.
    raw = pq.read_table(run.path("partition/quadrants.parquet"))
    assert raw.column_names == ["quadrant"] and raw.num_rows == 4
    t = read_labelled(run)
    assert t.schema.field("ppl_bin").type == pa.int8() and t.schema.field("pd_bin").type == pa.int8()
    assert t.column_names[-3:] == ["quadrant", "ppl_bin", "pd_bin"]
    for b_ppl, b_pd, q in zip(t.column("ppl_bin").to_pylist(), t.column("pd_bin").to_pylist(), t.column("quadrant").to_pylist()):
        assert q == cell_name(b_ppl, b_pd, 2, 2)
    assert t.column("quadrant").to_pylist() == ["Q1", "Q1", "Q4", "Q4"]


def test_independent_medians_follow_correlation(run):
    rng = np.random.default_rng(1)
    ppl = rng.lognormal(size=400)
    pd = ppl + rng.normal(scale=0.3, size=400)  # strongly correlated: Q1 and Q4 dominate
    write_scores(run, {"ppl": ppl, "pd": pd})
    partition_documents(PartitionConfig(split="independent"), run)
    high_ppl, high_pd = ppl > np.median(ppl), pd > np.median(pd)
    expected = {"Q1": int(np.sum(~high_ppl & ~high_pd)), "Q2": int(np.sum(~high_ppl & high_pd)),
                "Q3": int(np.sum(high_ppl & ~high_pd)), "Q4": int(np.sum(high_ppl & high_pd))}
    got = {n: c["docs"] for n, c in cells(run).items()}
    assert got == expected
    assert got["Q1"] > 2 * got["Q2"]


def test_token_weighted_cuts_balance_tokens_not_documents(run):
    rng = np.random.default_rng(2)
    n = 400
    ppl = rng.uniform(1, 10, n)
    n_tokens = np.where(ppl > 5, 100, 10)  # high-PPL documents are long
    write_scores(run, {"ppl": ppl, "pd": rng.uniform(size=n), "n_tokens": n_tokens})
    partition_documents(PartitionConfig(weight="tokens"), run)
    c = cells(run)
    total = sum(x["tokens"] for x in c.values())
    for x in c.values():
        assert abs(x["tokens"] - total / 4) <= 2 * 100  # equal tokens up to a document per cut
    docs = {n: x["docs"] for n, x in c.items()}
    assert docs["Q1"] + docs["Q2"] > 2 * (docs["Q3"] + docs["Q4"])  # many short low-PPL documents
    partition_documents(PartitionConfig(weight="docs"), run)
    assert {x["docs"] for x in cells(run).values()} == {100}


def test_stratified_cut_points_are_per_source(run):
    n = 200
    source = ["books"] * n + ["math"] * n
    ppl = list(np.linspace(50, 100, n)) + list(np.linspace(1, 5, n))  # books always higher PPL
    pd = list(np.linspace(0, 1, n)) * 2
    write_scores(run, {"ppl": ppl, "pd": pd, "source": source})
    partition_documents(PartitionConfig(), run)
    assert cells(run)["Q3"]["source_mix"] == {"books": 1.0}
    partition_documents(PartitionConfig(stratify_by_source=True), run)
    c = cells(run)
    for name in ("Q1", "Q2", "Q3", "Q4"):
        assert c[name]["docs"] == 100
        assert set(c[name]["source_mix"]) == {"books", "math"}
    groups = {(x["axis"], x["source"]) for x in summary(run)["cut_points"]}
    assert groups == {("ppl", "books"), ("ppl", "math"), ("pd", "books"), ("pd", "math")}


def hand_quadrants(ppl, pd, source, split, n_tokens, weight: str) -> list[str]:
    """FRAME's quadrants computed directly: per source, the PPL median of its train documents,
    then the PD median of the train documents in each (source, PPL half); every split labelled."""
    def median(values, tokens):
        if weight == "docs":
            return np.quantile(values, 0.5)  # linear interpolation at (n - 1) q, as quantile_cont
        order = np.argsort(values)
        running = np.cumsum(tokens[order])
        return values[order][np.argmax(running >= 0.5 * running[-1])]  # smallest value reaching half the tokens

    quadrant = np.empty(len(ppl), object)
    for s in np.unique(source):
        fit = (source == s) & (split == "train")
        high_ppl = ppl > median(ppl[fit], n_tokens[fit])
        for high in (False, True):
            members = (source == s) & (high_ppl == high)
            high_pd = pd > median(pd[members & fit], n_tokens[members & fit])
            quadrant[members & ~high_pd], quadrant[members & high_pd] = ("Q3", "Q4") if high else ("Q1", "Q2")
    return quadrant.tolist()


@pytest.mark.parametrize("weight", ["docs", "tokens"])
def test_nested_stratified_quadrants_match_a_direct_computation(run, weight):
    rng = np.random.default_rng(4)
    n = 900
    source = rng.choice(["books", "code", "math"], n)
    ppl = rng.lognormal(size=n) * np.select([source == "books", source == "code"], [20.0, 5.0], 1.0)
    pd = rng.normal(size=n) + (source == "math")
    split = np.where(rng.random(n) < 0.8, "train", "heldout")
    n_tokens = rng.integers(1, 500, n)
    write_scores(run, {"ppl": ppl, "pd": pd, "source": source.tolist(), "split": split.tolist(), "n_tokens": n_tokens})
    partition_documents(PartitionConfig(stratify_by_source=True, weight=weight), run)
    got = labels(run)
    assert [got[f"d{i:04d}"] for i in range(n)] == hand_quadrants(ppl, pd, source, split, n_tokens, weight)


def test_grid_cells_are_named_by_bins(run):
    ppl = np.arange(1, 61, dtype=float)
    pd = np.tile(np.arange(1, 21, dtype=float), 3)
    write_scores(run, {"ppl": ppl, "pd": pd})
    partition_documents(PartitionConfig(ppl_quantiles=[1 / 3, 2 / 3], pd_quantiles=[0.5]), run)
    c = cells(run)
    assert sorted(c) == ["P0D0", "P0D1", "P1D0", "P1D1", "P2D0", "P2D1"]
    assert {x["docs"] for x in c.values()} == {10}
    assert summary(run)["grid"] == {"ppl_bins": 3, "pd_bins": 2}
    t = read_labelled(run).to_pandas()
    assert (t.groupby("quadrant").ppl.max() < t.groupby("quadrant").ppl.min().shift(-2).fillna(np.inf)).all()


def test_bad_scores_are_excluded_and_counted(run):
    nan, inf = float("nan"), float("inf")
    ppl = [1, 2, 3, 4, nan, inf, None, 5, 6, 7]
    pd = [1, 2, 3, 4, 0.5, 0.5, 0.5, -inf, nan, 8]
    status = ["ok"] * 9 + ["too_short"]
    write_scores(run, {"ppl": ppl, "pd": pd, "status": status})
    counts = partition_documents(PartitionConfig(), run)
    assert counts["excluded_by_reason"] == {"nan_ppl": 1, "inf_ppl": 1, "missing_ppl": 1, "inf_pd": 1, "nan_pd": 1, "too_short": 1}
    assert summary(run)["excluded"] == counts["excluded_by_reason"]
    assert sorted(labels(run)) == ["d0000", "d0001", "d0002", "d0003"]


def test_nan_only_column_is_caught_despite_parquet_statistics(run):
    # Parquet min/max statistics omit NaN; a reader trusting them would keep this document.
    write_scores(run, {"ppl": [1.0, float("nan"), 3.0, 4.0, 5.0], "pd": [1.0, 2.0, 3.0, 4.0, 5.0]})
    counts = partition_documents(PartitionConfig(), run)
    assert counts["excluded_by_reason"] == {"nan_ppl": 1}
    assert "d0001" not in labels(run)


def test_cut_points_fit_on_train_and_label_every_split(run):
    ppl = [1, 2, 3, 4, 1000, 2000, 0.5]
    pd = [1, 2, 1, 2, 1, 2, 5]
    split = ["train"] * 4 + ["heldout", "ref", "heldout"]
    write_scores(run, {"ppl": ppl, "pd": pd, "split": split})
    partition_documents(PartitionConfig(split="independent"), run)
    got = labels(run)
    assert [c["cuts"] for c in summary(run)["cut_points"] if c["axis"] == "ppl"] == [[2.5]]
    assert got["d0004"] == "Q3" and got["d0005"] == "Q4" and got["d0006"] == "Q2"
    c = cells(run)
    assert sum(x["docs"] for x in c.values()) == 4  # cell sizes count the fit split
    assert c["Q4"]["docs_by_split"] == {"ref": 1, "train": 1}


def test_output_keeps_input_order_and_is_reproducible(run):
    rng = np.random.default_rng(3)
    write_scores(run, {"ppl": rng.lognormal(size=3000), "pd": rng.uniform(size=3000),
                       "source": rng.choice(["a", "b"], 3000).tolist()})
    partition_documents(PartitionConfig(stratify_by_source=True, threads=2), run)
    first = read_labelled(run)
    assert first.column("id").to_pylist() == [f"d{i:04d}" for i in range(3000)]
    partition_documents(PartitionConfig(stratify_by_source=True, threads=1), run)
    assert read_labelled(run).equals(first)


def test_missing_inputs_and_columns_are_named(run):
    with pytest.raises(FramelmError, match="scores.parquet not found"):
        partition_documents(PartitionConfig(), run)
    run.path("score").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "ppl": [1.0]}), run.path("score/scores.parquet"))
    with pytest.raises(FramelmError, match="missing column.*source"):
        partition_documents(PartitionConfig(), run)
    write_scores(run, {"ppl": [1.0], "pd": [1.0], "split": ["heldout"]})
    with pytest.raises(FramelmError, match="no document with split 'train'"):
        partition_documents(PartitionConfig(), run)


@pytest.mark.parametrize("bad, match", [
    ({"ppl_quantiles": [0.6, 0.4]}, "increasing"),
    ({"pd_quantiles": [1.0]}, "strictly between"),
    ({"ppl_quantiles": []}, "at least one"),
    ({"weight": "bytes"}, "choose one of"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        PartitionConfig.from_dict(bad)


def test_cli_runs_the_stage_and_prints_the_table(run, capsys):
    write_scores(run, {"ppl": [1, 2, 3, 4, 5, 6, 7, 8], "pd": [1, 2, 3, 4, 5, 6, 7, 8]})
    run.update_record("score", {"stage": "score", "status": "done", "hash": "fixture"})
    assert main(["partition", "--run-dir", str(run.root), "--quiet", "--split", "independent"]) == 0
    out = capsys.readouterr().out
    assert "partition (independent, docs-weighted" in out and "Q4" in out
    rec = run.record("partition")
    assert rec["status"] == "done" and rec["counts"]["labelled"] == 8
    assert math.isclose(sum(c["token_share"] for c in cells(run).values()), 1.0)


def test_a_failed_count_leaves_no_label_file(run, monkeypatch):
    from framelm import partition as part

    write_scores(run, {"ppl": [1, 2, 3, 4], "pd": [4, 3, 2, 1]})

    def fail(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(part, "code_totals", fail)
    with pytest.raises(MemoryError):
        partition_documents(PartitionConfig(), run)
    assert not run.path("partition/quadrants.parquet").exists()
    assert not [p.name for p in run.path("partition").iterdir() if "quadrants" in p.name]  # nor its temporary file


def test_documents_in_a_ppl_bin_without_fit_documents_are_counted_as_such(tmp_path, caplog):
    # Ties at the PPL median put every fit document in the low bin; the two held-out documents
    # above it have no PD cut points to be binned by.
    run = RunDir(tmp_path / "run")
    write_scores(run, {"ppl": [1, 2, 2, 2, 2, 2, 5, 9], "pd": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.1, 0.9],
                       "split": ["train"] * 6 + ["heldout"] * 2})
    counts = partition_documents(PartitionConfig(), run)
    assert counts["labelled"] == 6 and counts["excluded_by_reason"] == {"no_fit_documents_in_ppl_bin": 2}
    assert "PPL bin that holds no 'train' documents" in caplog.text
