import logging
import warnings
from collections import Counter
from dataclasses import replace as dataclasses_replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framelm.errors import ConfigError, FramelmError
from framelm.partition import PartitionConfig, partition_documents, read_labelled
from framelm.rundir import RunDir
from framelm.schedule import (
    Builder, Corpus, PoolStream, ScheduleConfig, Stage, StrategyConfig, assemble, build_schedules, load_stages,
    read_yaml_schedule, transition_share,
)

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


def order(run, name):
    return pq.read_table(run.path(f"schedule/{name}/order.parquet")).to_pandas()


def build(run, strategies, **kw):
    return build_schedules(ScheduleConfig.from_dict({"strategies": strategies, **kw}), run)


def test_frame_orders_q3_q4_q1_q2_over_train_documents(run):
    build(run, [{"kind": "frame"}], transition="hard")
    info = load_stages(run.path("schedule/frame/stages.yaml"))
    assert [s["name"] for s in info["stages"]] == ["Q3", "Q4", "Q1", "Q2"]
    o = order(run, "frame")
    assert o.quadrant.tolist() == sorted(o.quadrant, key=["Q3", "Q4", "Q1", "Q2"].index)
    assert (o.stage.values == o.quadrant.map({"Q3": 0, "Q4": 1, "Q1": 2, "Q2": 3}).values).all()
    labelled = read_labelled(run, ["id", "split"]).to_pandas()
    assert sorted(o.id) == sorted(labelled.id[labelled.split == "train"])  # one pass, labelled train documents only
    assert "d0001" not in set(o.id) and len(o) == 539
    assert o.position.tolist() == list(range(len(o))) and set(o.epoch) == {0}
    # budgets proportional to quadrant tokens: one pass gives exactly each quadrant's tokens
    by_cell = (o.n_tokens + 1).groupby(o.quadrant).sum()
    assert {s["name"]: s["tokens"] for s in info["stages"]} == by_cell.to_dict()


def test_stage_ranges_match_order_parquet(run):
    counts = build(run, [{"kind": "frame"}, {"kind": "two_phase", "blends": [{"web": 1.0}, {"math": 0.5, "books": 0.5}]}],
                   seq_len=16, global_batch=4, total_tokens=30_000)
    assert "frame: Q3" in counts["summary"]
    for name in ("frame", "two_phase"):
        info = load_stages(run.path(f"schedule/{name}/stages.yaml"))
        o = order(run, name)
        w = o.n_tokens + 1
        assert info["total_tokens"] == int(w.sum()) and info["total_docs"] == len(o)
        assert info["tokens_per_step"] == 64 and info["total_steps"] == info["total_tokens"] // 64
        assert info["tail_tokens"] == info["total_tokens"] % 64
        start = 0
        for k, s in enumerate(info["stages"]):
            assert s["start_token"] == start and s["end_token"] - s["start_token"] == s["tokens"]
            assert s["tokens"] == int(w[o.stage == k].sum()) and s["docs"] == int((o.stage == k).sum())
            assert s["start_step"] == s["start_token"] // 64
            assert s["end_step"] == min(-(-s["end_token"] // 64), info["total_steps"])  # no step a trainer skips
            assert abs(sum(s["composition"]["cells"].values()) - 1) < 1e-5
            assert abs(sum(s["composition"]["sources"].values()) - 1) < 1e-5
            start = s["end_token"]
        # a stage's documents sit around its nominal range: at most the transition window outside it
        cum = np.concatenate([[0], np.cumsum(w.values)])
        for k, s in enumerate(info["stages"]):
            pos = cum[:-1][o.stage.values == k]
            slack = 0.06 * s["tokens"] + 80
            assert pos.min() >= s["start_token"] - slack and pos.max() < s["end_token"] + slack


@pytest.mark.parametrize("total_tokens", [None, 9_000, 60_000])
def test_random_and_frame_schedule_the_same_documents(run, total_tokens):
    strategies = [{"kind": "frame"}, {"kind": "random"}, {"kind": "permutation", "order": ["Q2", "Q1", "Q4", "Q3"]},
                  {"kind": "ppl_two_stage"}, {"kind": "pd_two_stage"}, {"kind": "sorted", "column": "pd"}]
    build(run, strategies, total_tokens=total_tokens)
    bags = {s["kind"]: Counter(zip(order(run, s["kind"]).id, order(run, s["kind"]).epoch)) for s in strategies}
    assert all(bag == bags["frame"] for bag in bags.values())
    f, r = order(run, "frame"), order(run, "random")
    assert f.id.tolist() != r.id.tolist()
    if total_tokens:
        assert abs(int((f.n_tokens + 1).sum()) - total_tokens) <= 4 * 80  # one document per cell at most
    if total_tokens == 60_000:
        assert f.epoch.max() >= 1
        info = load_stages(run.path("schedule/frame/stages.yaml"))
        data = sum(s["available_tokens"] for s in info["sources"].values())
        for s in info["sources"].values():
            assert s["epochs"] == pytest.approx(60_000 / data, rel=0.05)


def test_sorted_and_permutation_orders(run):
    build(run, [{"kind": "sorted", "column": "pd", "descending": True, "n_stages": 2},
                {"kind": "permutation", "name": "reverse", "order": ["Q2", "Q1", "Q4", "Q3"]}], transition="hard")
    o = order(run, "sorted")
    q = read_labelled(run).to_pandas().set_index("id")
    pd = q.loc[o.id, "pd"].values
    assert (np.diff(pd) <= 0).all()
    assert [s["name"] for s in load_stages(run.path("schedule/sorted/stages.yaml"))["stages"]] == ["pd_desc_1", "pd_desc_2"]
    assert order(run, "reverse").quadrant.drop_duplicates().tolist() == ["Q2", "Q1", "Q4", "Q3"]


def test_two_stage_splits(run):
    build(run, [{"kind": "ppl_two_stage"}, {"kind": "pd_two_stage"}], transition="hard")
    o = order(run, "ppl_two_stage")
    assert set(o[o.stage == 0].quadrant) == {"Q3", "Q4"} and set(o[o.stage == 1].quadrant) == {"Q1", "Q2"}
    o = order(run, "pd_two_stage")
    assert set(o[o.stage == 0].quadrant) == {"Q1", "Q3"} and set(o[o.stage == 1].quadrant) == {"Q2", "Q4"}


def test_two_stage_on_an_odd_grid_warns_of_the_uneven_split(caplog):
    cells = [{"name": f"P{p}D{d}", "ppl_bin": p, "pd_bin": d} for p in range(3) for d in range(3)]
    table = pa.table({"id": [f"d{i}" for i in range(90)], "source": ["web"] * 90,
                      "quadrant": [cells[i % 9]["name"] for i in range(90)], "n_tokens": pa.array([9] * 90, pa.int64())})
    builder = Builder(Corpus.from_table(table, cells), ScheduleConfig(strategies=[]))
    with caplog.at_level("WARNING", logger="framelm"):
        sched = builder.build(StrategyConfig(kind="ppl_two_stage"))
    assert [len(st.idx) for st in sched.stages] == [60, 30]  # PPL bins 1 and 2 high, bin 0 low
    assert "3 PPL bins, an odd number" in caplog.text and "gets 67% of the tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="framelm"):
        builder.build(StrategyConfig(kind="frame"))
    assert "odd number" not in caplog.text


def test_transition_curves_are_monotone_and_bounded():
    u = np.linspace(0, 1, 101)
    for kind in ("hard", "linear", "logistic"):
        s = transition_share(kind, u)
        assert (np.diff(s) >= 0).all() and s[0] == 0 and s[-1] == 1
        assert ((0 <= s) & (s <= 1)).all()
    logistic = transition_share("logistic", u)
    assert logistic[50] == pytest.approx(0.5) and logistic[10] < 0.05 and logistic[90] > 0.95


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_interleave_gives_the_next_stage_the_curve_and_the_last_its_complement(kind):
    from framelm.schedule.transitions import _interleave

    rng = np.random.default_rng(0)
    wa = rng.integers(1, 20, 5000)
    wb = rng.permutation(wa)  # equal token totals, as assemble's window halves: position = token fraction
    order = _interleave(wa, wb, kind, 10.0)
    is_b = order >= len(wa)
    # a merge: each stage's documents keep their order
    assert (order[~is_b] == np.arange(len(wa))).all() and (order[is_b] == np.arange(len(wa), 2 * len(wa))).all()
    w = np.concatenate([wa, wb])[order]
    u = (np.cumsum(w) - w / 2) / w.sum()  # each document's window position, at its token midpoint
    grid = np.linspace(0, 1, 10_001)[:-1]
    curve = transition_share(kind, grid)
    for k in range(10):
        docs, points = (u * 10).astype(int) == k, (grid * 10).astype(int) == k
        expected = curve[points].mean()
        assert w[docs & is_b].sum() / w[docs].sum() == pytest.approx(expected, abs=0.02)
        assert w[docs & ~is_b].sum() / w[docs].sum() == pytest.approx(1 - expected, abs=0.02)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_realised_share_in_the_window_tracks_the_curve(kind):
    rng = np.random.default_rng(0)
    n = 4000
    weight = rng.integers(1, 20, 2 * n).astype(np.int64)
    stages = [Stage("A", np.arange(n), np.zeros(n, np.int32), weight[:n]), Stage("B", np.arange(n, 2 * n), np.zeros(n, np.int32), weight[n:])]
    stream = assemble(stages, kind, window=0.5, steepness=10)
    assert stages == []  # consumed
    idx, stage = stream.idx, stream.stage
    assert (stream.weight == weight[idx]).all()
    assert sorted(idx.tolist()) == list(range(2 * n))
    w = weight[idx]
    cum = np.cumsum(w)
    total = cum[-1]
    # window: 50 % of the smaller stage, centred on the boundary
    boundary = weight[:n].sum()
    lo, hi = boundary - 0.25 * weight[:n].sum(), boundary + 0.25 * weight[n:].sum()
    edges = np.linspace(lo, hi, 11)
    shares = []
    for a, b in zip(edges, edges[1:]):
        sel = (cum > a) & (cum <= b)
        shares.append(w[sel & (stage == 1)].sum() / w[sel].sum())
    shares = np.array(shares)
    assert (np.diff(shares) > -0.08).all()  # rises, up to document granularity
    expected = transition_share(kind, (np.arange(10) + 0.5) / 10)
    assert np.abs(shares - expected).max() < 0.12
    assert (stage[cum <= lo] == 0).all() and (stage[cum > hi + 20] == 1).all()
    assert total == weight.sum()


def test_an_empty_stage_leaves_its_neighbours_blending():
    n = 400
    weight = np.full(2 * n, 5, np.int64)
    empty = np.array([], np.int64)
    stages = [Stage("A", np.arange(n), np.zeros(n, np.int32), weight[:n]),
              Stage("none", empty, np.zeros(0, np.int32), empty),
              Stage("B", np.arange(n, 2 * n), np.zeros(n, np.int32), weight[n:])]
    stream = assemble(stages, "linear", window=0.5, steepness=10)
    assert sorted(stream.idx.tolist()) == list(range(2 * n))
    assert set(stream.stage.tolist()) == {0, 2}  # labels name the stage a document came from
    assert (stream.idx[stream.stage == 2] >= n).all() and (stream.idx[stream.stage == 0] < n).all()
    # a window of 200 documents around the boundary: B starts before A's last document, which a
    # hard switch would never do
    assert (stream.stage[n - 100:n] == 2).any() and (stream.stage[n:n + 100] == 0).any()
    assert (stream.stage[:n - 100] == 0).all() and (stream.stage[n + 100:] == 2).all()


def test_two_phase_epochs_match_hand_computation():
    # web: 100 docs x 10 tokens (+EOS) = 1100; math: 20 docs x 10 = 220 tokens.
    corpus = make_corpus([10] * 120, ["Q1"] * 120, ["web"] * 100 + ["math"] * 20)
    cfg = ScheduleConfig(total_tokens=1100, strategies=[])
    strategy = StrategyConfig.from_dict({"kind": "two_phase", "phase_split": [0.6, 0.4],
                                         "blends": [{"web": 1.0}, {"web": 0.5, "math": 0.5}]})
    sched = Builder(corpus, cfg).build(strategy)
    tokens = {p.name: np.bincount(corpus.source[p.idx], weights=corpus.weight[p.idx], minlength=2) for p in sched.stages}
    web, math_ = corpus.source_names.index("web"), corpus.source_names.index("math")
    # phase 1: 660 web tokens; phase 2: 220 web + 220 math
    assert tokens["phase1"][web] == 660 and tokens["phase2"][web] == 220 and tokens["phase2"][math_] == 220
    # math is seen 220 / 220 = 1 epoch, web 880 / 1100 = 0.8
    assert sched.pool_tokens == {"math": 220, "web": 1100}
    # designed for 2200 tokens: sources are downsampled by 1100/2200 and keep the designed epochs
    strategy.design_tokens = 2200
    sched = Builder(corpus, cfg).build(strategy)
    assert sched.pool_tokens == {"math": 110, "web": 550}
    math_tokens = sum(corpus.weight[p.idx][corpus.source[p.idx] == math_].sum() for p in sched.stages)
    assert math_tokens / 110 == 2.0  # 0.4 * 0.5 * 2200 / 220 epochs at the design horizon
    epochs = np.concatenate([p.epoch[corpus.source[p.idx] == math_] for p in sched.stages])
    assert Counter(epochs.tolist()) == {0: 10, 1: 10}


def test_two_phase_keeps_a_source_smaller_than_one_downsampled_document():
    # web: 1000 docs x 100 tokens; math: 3 docs x 2000. Designed for 400 k tokens, a 50 k run samples
    # 1/8 of each source: math's 750-token target is under half a document, which rounds to none.
    corpus = make_corpus([99] * 1000 + [1999] * 3, ["Q1"] * 1003, ["web"] * 1000 + ["math"] * 3)
    strategy = StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"web": 1.0}, {"web": 0.7, "math": 0.3}],
                                         "design_tokens": 400_000})
    sched = Builder(corpus, ScheduleConfig(total_tokens=50_000, strategies=[])).build(strategy)
    assert sched.pool_tokens == {"math": 2000, "web": 12_500}
    tokens = {p.name: dict(zip(corpus.source_names, np.bincount(corpus.source[p.idx], weights=corpus.weight[p.idx],
                                                                minlength=2).tolist())) for p in sched.stages}
    # math's 0.3 * 20 k budget takes its one kept document 3 times
    assert tokens == {"phase1": {"math": 0, "web": 30_000}, "phase2": {"math": 6000, "web": 14_000}}
    math_ = corpus.source_names.index("math")
    assert sorted(sched.stages[1].epoch[corpus.source[sched.stages[1].idx] == math_].tolist()) == [0, 1, 2]


def test_two_phase_epoch_caps_apply_to_the_downsampled_pool():
    # math: 3 docs x 100 tokens. Designed for 15 k tokens, a 7 k run samples 7/15 of it: 140 tokens,
    # which rounds to one document, so math's 0.06 * 7 k = 420-token budget takes it 4 times, not
    # the 3 designed (0.06 * 15 k / 300).
    corpus = make_corpus([99] * 1003, ["Q1"] * 1003, ["web"] * 1000 + ["math"] * 3)
    strategy = StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"web": 1.0}, {"web": 0.85, "math": 0.15}],
                                         "design_tokens": 15_000})
    cfg = ScheduleConfig(total_tokens=7000, strategies=[])
    sched = Builder(corpus, cfg).build(strategy)
    math_ = corpus.source_names.index("math")
    assert sched.pool_tokens["math"] == 100
    assert sum(int((corpus.source[p.idx] == math_).sum()) for p in sched.stages) == 4
    with pytest.raises(FramelmError, match=r"source 'math' needs 4.2 epochs \(6.0% of 7,000 tokens, drawn from a "
                                           r"100-token sample of its 300 for design_tokens 15,000\) but at most 3.5"):
        Builder(corpus, cfg).build(dataclasses_replace(strategy, epoch_caps={"math": 3.5}))


def test_a_budget_too_small_for_any_document_is_refused(tmp_path):
    corpus = make_corpus([10] * 40, ["Q1", "Q2", "Q3", "Q4"] * 10, ["web", "math"] * 20)
    tiny = ScheduleConfig(total_tokens=3, strategies=[])
    for strategy in (StrategyConfig(kind="frame"), StrategyConfig(kind="random"),
                     StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"web": 1.0}, {"math": 1.0}]})):
        with pytest.raises(ConfigError, match=rf"strategy '{strategy.kind}': no document fits total_tokens = 3: "
                                              r".*the shortest document holds 11 tokens with its EOS; raise total_tokens"):
            Builder(corpus, tiny).build(strategy)
    path = write_yaml(tmp_path, "stages:\n - {tokens: 2, mix: {web: 1.0}}\n")
    with pytest.raises(ConfigError, match=r"no document fits the stage budgets of .*schedule.yaml: .*; raise them"):
        Builder(corpus, tiny).build(StrategyConfig(kind="yaml", path=str(path)))


def test_epoch_caps_name_the_source():
    corpus = make_corpus([10] * 120, ["Q1"] * 120, ["web"] * 100 + ["math"] * 20)
    strategy = StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"web": 1.0}, {"math": 1.0}],
                                         "epoch_caps": {"math": 1.5}})
    # math fills phase 2: 0.4 * 1100 = 440 tokens from 220 available = 2 epochs
    with pytest.raises(FramelmError, match=r"source 'math' needs 2 epochs .*at most 1.5 are allowed"):
        Builder(corpus, ScheduleConfig(total_tokens=1100, strategies=[])).build(strategy)
    with pytest.raises(FramelmError, match=r"source '(math|web)' needs 3 epochs but at most 2 are allowed"):
        Builder(corpus, ScheduleConfig(total_tokens=3960, max_epochs=2, strategies=[])).build(StrategyConfig(kind="frame"))
    with pytest.raises(ConfigError, match="epoch_caps.wiki' names no source"):
        Builder(corpus, ScheduleConfig(strategies=[])).build(StrategyConfig(kind="frame", epoch_caps={"wiki": 1}))


def test_grid_frame_order_is_high_ppl_first_then_low_pd():
    cells = [{"name": f"P{i}D{j}", "ppl_bin": i, "pd_bin": j} for i in range(3) for j in range(2)]
    n = 60
    table = pa.table({"id": [f"d{i}" for i in range(n)], "source": ["web"] * n,
                      "quadrant": [cells[i % 6]["name"] for i in range(n)], "n_tokens": pa.array([5] * n, pa.int64())})
    corpus = Corpus.from_table(table, cells)
    sched = Builder(corpus, ScheduleConfig(strategies=[])).build(StrategyConfig(kind="frame"))
    assert [s.name for s in sched.stages] == ["P2D0", "P2D1", "P1D0", "P1D1", "P0D0", "P0D1"]
    two = Builder(corpus, ScheduleConfig(strategies=[])).build(StrategyConfig(kind="ppl_two_stage"))
    assert set(corpus.cell[two.stages[0].idx]) == {corpus.cell_names.index(c) for c in ("P1D0", "P1D1", "P2D0", "P2D1")}


def test_pool_stream_repeats_with_fresh_permutations_and_no_drift():
    weight = np.full(10, 3, np.int64)
    stream = PoolStream("cell:Q1", np.arange(10), weight, seed=0)
    taken = [stream.take(7.5) for _ in range(8)]  # 60 tokens = 20 documents = 2 epochs
    idx = np.concatenate([t[0] for t in taken])
    epoch = np.concatenate([t[1] for t in taken])
    assert len(idx) == 20 and sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
    assert epoch.tolist() == [0] * 10 + [1] * 10
    assert idx[:10].tolist() != idx[10:].tolist()


def test_pool_stream_refuses_to_draw_from_an_empty_pool():
    stream = PoolStream("source:math", np.empty(0, np.int64), np.ones(5, np.int64), seed=0)
    assert all(len(a) == 0 for a in stream.take(0))
    with pytest.raises(FramelmError, match="pool 'source:math' has no documents to draw 50 tokens from"):
        stream.take(50)


def write_yaml(tmp_path, text):
    path = tmp_path / "schedule.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, match", [
    ("stages:\n - {share: 1.0, mix: {Q1: 0.5, Q2: 0.4}}\n", r"stages\[0\].mix: weights sum to 0.9"),
    ("stages:\n - {share: 0.5, mix: {Q1: 1.0}}\n - {share: 0.4, mix: {Q2: 1.0}}\n", "stage shares sum to 0.9"),
    ("stages:\n - {share: 1.0, tokens: 5, mix: {Q1: 1}}\n", "exactly one of 'tokens'"),
    ("stages:\n - {share: 1.0, mix: {Q9: 1}}\n", "'Q9' is neither a cell"),
    ("stages:\n - {share: 1.0, mix: {Q1: 0.5, web: 0.5}}\n", "both cells and sources"),
    ("stages:\n - {share: 1.0, mix: {Q1: -1, Q2: 2}}\n", r"Q1: weight -1 must be"),
    ("stages:\n - {share: 1.0, mix: {Q1: 1}, weight: 2}\n", "unknown key 'weight'"),
    ("stages:\n - {name: a, share: 0.5, mix: {Q1: 1}}\n - {name: a, share: 0.5, mix: {Q2: 1}}\n", "'a' is used twice"),
    ("stages: [\n", "line 2"),
    ("steps: []\n", "unknown key 'steps'"),
])
def test_yaml_schedule_validation(tmp_path, text, match):
    corpus = random_corpus(20)
    with pytest.raises(ConfigError, match=match):
        read_yaml_schedule(write_yaml(tmp_path, text), corpus)


def test_yaml_schedule_builds_stages_by_source(run, tmp_path):
    path = write_yaml(tmp_path, "stages:\n - {name: warm, tokens: 4000, mix: {web: 0.8, math: 0.2}}\n"
                                " - {name: main, tokens: 6000, mix: {books: 0.5, math: 0.5}}\nepoch_caps: {math: 10}\n")
    build(run, [{"kind": "yaml", "name": "custom", "path": str(path)}], transition="hard")
    info = load_stages(run.path("schedule/custom/stages.yaml"))
    assert [s["name"] for s in info["stages"]] == ["warm", "main"]
    assert abs(info["stages"][0]["tokens"] - 4000) <= 160 and abs(info["stages"][1]["tokens"] - 6000) <= 160
    assert info["stages"][0]["composition"]["sources"]["web"] == pytest.approx(0.8, abs=0.03)
    assert set(info["stages"][1]["composition"]["sources"]) == {"books", "math"}


def test_a_killed_run_resumes_to_the_same_files(run):
    strategies = [{"kind": "frame"}, {"kind": "random"}]
    build(run, strategies, total_tokens=20_000)
    files = {p: p.read_bytes() for p in run.path("schedule").rglob("*") if p.is_file()}
    # as if killed after frame finished: random's files are gone, frame's marker says done
    for p in run.path("schedule/random").iterdir():
        p.unlink()
    (run.path("schedule/frame/order.parquet")).touch()  # a finished strategy is not rebuilt
    mtime = run.path("schedule/frame/order.parquet").stat().st_mtime_ns
    build(run, strategies, total_tokens=20_000)
    assert run.path("schedule/frame/order.parquet").stat().st_mtime_ns == mtime
    assert {p: p.read_bytes() for p in run.path("schedule").rglob("*") if p.is_file()} == files


def test_config_errors():
    with pytest.raises(ConfigError, match="named 'frame'"):
        ScheduleConfig.from_dict({"strategies": [{"kind": "frame"}, {"kind": "frame"}]})
    with pytest.raises(ConfigError, match="needs 'order'"):
        ScheduleConfig.from_dict({"strategies": [{"kind": "permutation"}]})
    with pytest.raises(ConfigError, match=r"blends\[1\]: weights sum to 1.2"):
        StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"a": 1}, {"a": 0.6, "b": 0.6}]})
    with pytest.raises(ConfigError, match="'order' must name every non-empty cell once"):
        Builder(random_corpus(40), ScheduleConfig(strategies=[])).build(StrategyConfig(kind="permutation", order=["Q1", "Q2", "Q3"]))


def test_missing_partition_is_explained(tmp_path):
    with pytest.raises(FramelmError, match="run the partition stage first"):
        build_schedules(ScheduleConfig(), RunDir(tmp_path / "empty"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n=st.integers(5, 120), scale=st.floats(0.05, 3.0),
       kind=st.sampled_from(["frame", "random", "ppl_two_stage", "sorted"]),
       transition=st.sampled_from(["hard", "linear", "logistic"]), window=st.floats(0.0, 1.0))
def test_property_cell_strategies_conserve_documents_and_budgets(seed, n, scale, kind, transition, window):
    corpus = random_corpus(n, seed)
    data = int(corpus.weight.sum())
    total = None if scale > 2.5 else max(1, int(data * scale))
    cfg = ScheduleConfig(total_tokens=total, transition=transition, transition_window=window, strategies=[], seed=seed)
    try:
        sched = Builder(corpus, cfg).build(StrategyConfig(kind=kind, column="n_tokens"))
    except ConfigError as exc:
        # refused only when every cell's budget is under half a document: below 4 half documents in all
        assert "no document fits" in str(exc) and total is not None and total < 2 * int(corpus.weight.max())
        return
    stream = assemble(list(sched.stages), transition, window, 10.0)
    idx, epoch, stage = stream.idx, stream.epoch, stream.stage
    assert (stream.weight == corpus.weight[idx]).all()
    assert Counter(zip(idx.tolist(), epoch.tolist())) == Counter(
        zip(np.concatenate([s.idx for s in sched.stages]).tolist(), np.concatenate([s.epoch for s in sched.stages]).tolist()))
    got = int(corpus.weight[idx].sum())
    if total is None:
        assert sorted(idx.tolist()) == list(range(n))  # one pass: every document exactly once
    else:
        assert abs(got - total) <= 4 * int(corpus.weight.max())  # nearest document boundary per cell
    for k in range(len(sched.stages)):  # a stage's documents keep their label through blending
        assert sorted(idx[stage == k].tolist()) == sorted(sched.stages[k].idx.tolist())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), weights=st.lists(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3), min_size=1, max_size=4),
       budgets=st.lists(st.integers(1, 5000), min_size=4, max_size=4))
def test_property_yaml_budgets_and_weights_are_respected(tmp_path_factory, seed, weights, budgets):
    corpus = random_corpus(200, seed)
    stages = []
    for k, w in enumerate(weights):
        w = np.array(w) / sum(w)
        mix = dict(zip(corpus.source_names, w.tolist()))
        stages.append({"name": f"s{k}", "tokens": budgets[k], "mix": mix})
    path = tmp_path_factory.mktemp("y") / "s.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    max_w = int(corpus.weight.max())
    try:
        sched = Builder(corpus, ScheduleConfig(strategies=[], seed=seed)).build(StrategyConfig(kind="yaml", path=str(path)))
    except ConfigError as exc:
        # refused only when every source's demand is under half a document
        assert "no document fits" in str(exc) and sum(st_["tokens"] for st_ in stages) < len(corpus.source_names) * max_w / 2
        return
    assert [st_.name for st_ in sched.stages] == [spec["name"] for spec in stages]  # none dropped or added
    for spec, st_ in zip(stages, sched.stages):
        per_source = np.bincount(corpus.source[st_.idx], weights=corpus.weight[st_.idx], minlength=len(corpus.source_names))
        for s, share in spec["mix"].items():
            # each source's running target is met to the nearest document
            assert abs(per_source[corpus.source_names.index(s)] - share * spec["tokens"]) <= 2 * max_w


def test_cli_runs_partition_then_schedule_and_writes_exactly_the_contract_files(tmp_path, capsys):
    from framelm.cli import main

    run = RunDir(tmp_path / "cli")
    run.path("score").mkdir(parents=True)
    rng = np.random.default_rng(5)
    pq.write_table(pa.table({
        "id": [f"d{i}" for i in range(80)], "source": ["web", "math"] * 40, "split": ["train"] * 80,
        "n_tokens": pa.array(rng.integers(1, 30, 80), pa.int64()), "ppl": rng.lognormal(size=80),
        "pd": rng.uniform(size=80), "status": ["ok"] * 80,
    }), run.path("score/scores.parquet"))
    run.update_record("score", {"stage": "score", "status": "done", "hash": "fixture"})
    assert main(["partition", "--run-dir", str(run.root), "--quiet"]) == 0
    assert main(["schedule", "--run-dir", str(run.root), "--quiet", "--seq-len", "8", "--global-batch", "2",
                 "--set", "strategies=[{kind: frame}, {kind: random}, {kind: permutation, name: reverse, order: [Q2, Q1, Q4, Q3]}]"]) == 0
    out = capsys.readouterr().out
    assert "frame: Q3" in out and "reverse: Q2" in out
    written = sorted(str(p.relative_to(run.path("schedule"))) for p in run.path("schedule").rglob("*") if p.is_file())
    assert written == [".framelm-hash"] + [f"{s}/{f}" for s in ("frame", "random", "reverse")
                                           for f in (".stages.yaml.done", "order.parquet", "stages.yaml")]
    assert run.record("schedule")["status"] == "done"
    schema = pq.read_schema(run.path("schedule/frame/order.parquet"))
    assert [(f.name, str(f.type)) for f in schema] == [
        ("position", "int64"), ("id", "string"), ("stage", "int32"), ("source", "string"),
        ("quadrant", "string"), ("n_tokens", "int64"), ("epoch", "int32")]


def test_sorted_reads_any_numeric_score_column(run):
    scores = pq.read_table(run.path("score/scores.parquet"))
    pq.write_table(scores.append_column("bpb_weak", pa.array(np.arange(scores.num_rows, 0, -1), pa.float64())),
                   run.path("score/scores.parquet"))
    partition_documents(PartitionConfig(), run)  # the labels belong to the file they were made for
    build(run, [{"kind": "sorted", "column": "bpb_weak"}])
    ids = order(run, "sorted").id
    assert ids.tolist() == sorted(ids, key=lambda i: -int(i[1:]))  # bpb_weak falls with the row number
    with pytest.raises(ConfigError, match="'column' = 'colour' is not a numeric column.*bpb_weak"):
        build(run, [{"kind": "sorted", "name": "bad", "column": "colour"}])


def test_two_phase_tiers_split_their_weight_by_source_tokens():
    # web 1100 tokens (low tier); math 220 and books 440 tokens (high tier)
    corpus = make_corpus([10] * 160, ["Q1"] * 160, ["web"] * 100 + ["math"] * 20 + ["books"] * 40)
    strategy = StrategyConfig.from_dict({"kind": "two_phase", "tiers": {"web": "low", "math": "high", "books": "high"},
                                         "blends": [{"low": 1.0}, {"high": 0.9, "web": 0.1}]})
    sched = Builder(corpus, ScheduleConfig(total_tokens=1000, strategies=[], transition="hard")).build(strategy)
    phase2 = sched.stages[1]
    tokens = np.bincount(corpus.source[phase2.idx], weights=corpus.weight[phase2.idx], minlength=3)
    by_name = dict(zip(corpus.source_names, tokens.tolist()))
    # targets: 400 * 0.9 split 2:1 by tokens = books 240, math 120; web 400 * 0.1 = 40. Documents are
    # 11 tokens, so each lands on the nearest boundary of its source's running target: web's
    # stream has already given 55 documents (605 tokens for 600) in phase 1, so 640 -> 58 documents.
    assert by_name == {"books": 242, "math": 121, "web": 33}
    with pytest.raises(ConfigError, match="'medium' is neither a source"):
        Builder(corpus, ScheduleConfig(strategies=[])).build(
            dataclasses_replace(strategy, blends=[{"medium": 1.0}, {"high": 1.0}]))


def test_order_written_in_many_row_groups_equals_one(run, monkeypatch):
    from framelm.schedule import build as build_module  # write_order reads WRITE_CHUNK_ROWS there

    build(run, [{"kind": "frame"}])
    whole = pq.read_table(run.path("schedule/frame/order.parquet"))
    monkeypatch.setattr(build_module, "WRITE_CHUNK_ROWS", 37)
    build(run, [{"kind": "frame", "name": "chunked"}])
    assert pq.ParquetFile(run.path("schedule/chunked/order.parquet")).metadata.num_row_groups > 10
    assert pq.read_table(run.path("schedule/chunked/order.parquet")).equals(whole)


def test_ids_are_read_into_one_array(tmp_path):
    from framelm.schedule.corpus import _read_ids

    rng = np.random.default_rng(0)
    ids = [f"d{i}-{'x' * int(rng.integers(0, 5))}" for i in range(40)]
    path = tmp_path / "scores.parquet"
    for kind in (pa.string(), pa.large_string()):
        pq.write_table(pa.table({"id": pa.array(ids, kind)}), path, row_group_size=7)  # six row groups
        got = _read_ids(path)
        assert isinstance(got, pa.Array) and got.to_pylist() == ids  # one array, not a chunked one
    # Repeated ids dictionary-encode into fewer bytes than they expand to: the buffer grows.
    repeated = ["a-rather-long-document-id"] * 300
    pq.write_table(pa.table({"id": repeated}), path, row_group_size=100, use_dictionary=True)
    assert _read_ids(path).to_pylist() == repeated
    pq.write_table(pa.table({"id": pa.array(range(10), pa.int64())}), path)  # numbers read as their text
    assert _read_ids(path).to_pylist() == [str(i) for i in range(10)]
    pq.write_table(pa.table({"id": ["a", None, "c"]}), path)
    with pytest.raises(FramelmError, match=r"scores\.parquet: 1 document\(s\) among rows 0-2 have no id"):
        _read_ids(path)


def test_pool_members_and_window_sizes_match_their_direct_computation(monkeypatch):
    from framelm.schedule import strategies, transitions

    rng = np.random.default_rng(0)
    monkeypatch.setattr(strategies, "MEMBER_SLICE_ROWS", 1000)  # many slices, one of them short
    for n_codes in (1, 5, 40):  # a pass per code, and the sort
        codes = rng.integers(0, n_codes, 10_500).astype(np.int16)
        members = Builder._members(codes, n_codes)
        assert all(m.dtype == np.int32 for m in members)
        assert [m.tolist() for m in members] == [np.flatnonzero(codes == c).tolist() for c in range(n_codes)]
    weight = rng.integers(1, 50, 300_000).astype(np.int32)
    cum = np.cumsum(weight, dtype=np.int64)
    for tokens in (0, 10, 1e5, 1.7e6, 3.2e6, float(cum[-1]), 1e12):  # inside the first block, later blocks, past the end
        assert transitions._docs_within(weight, tokens) == np.searchsorted(cum, tokens, side="right")
    back = np.cumsum(weight[::-1], dtype=np.int64)
    assert transitions._docs_within(weight[::-1], 2.5e6) == np.searchsorted(back, 2.5e6, side="right")


def test_bucket_shuffle_is_a_uniform_permutation_moving_arrays_together(monkeypatch):
    from framelm.schedule import pools

    monkeypatch.setattr(pools, "SHUFFLE_BUCKET_ROWS", 2)  # 12 rows: 6 buckets
    a, b = np.arange(12), np.arange(12) * 10
    x, y = pools.shuffled(np.random.default_rng(1), a, b)
    assert sorted(x.tolist()) == list(range(12)) and (y == x * 10).all() and x.tolist() != list(range(12))
    again, _ = pools.shuffled(np.random.default_rng(1), a, b)
    assert (again == x).all()  # the seed decides
    rng = np.random.default_rng(0)
    where = np.zeros((12, 12))  # row i: how often element i lands at each position
    for _ in range(6000):
        (perm,) = pools.shuffled(rng, a)
        where[perm, np.arange(12)] += 1
    assert np.abs(where - 500).max() < 5 * np.sqrt(500)  # every position equally likely, to 5 standard deviations


def test_table_rows_map_to_the_partition_cells_by_name():
    corpus = make_corpus([5, 6, 7, 8], ["Q4", None, "Q1", "Q3"], ["web"] * 4)
    assert [corpus.cell_names[c] for c in corpus.cell] == ["Q4", "Q1", "Q3"]  # the unlabelled row is no document
    assert corpus.weight.tolist() == [6, 8, 9]
    with pytest.raises(FramelmError, match=r"cell 'Q7' is not in the partition's cells \['Q1', 'Q2', 'Q3', 'Q4'\]"):
        make_corpus([5, 6], ["Q1", "Q7"], ["web"] * 2)


def test_schedules_too_short_for_their_steps_or_repeating_data_are_warned_about(run, caplog):
    # one pass over the fixture's train documents is about 22k tokens: under one default step of 32 * 1024
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame"}])
    assert "less than one optimizer step of global_batch * seq_len = 32 * 1024" in caplog.text
    assert "schedule.total_tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "few"}], seq_len=128, global_batch=64)
    assert "whole optimizer steps of 8,192 tokens (global_batch * seq_len) for 4 stages" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "fine"}], seq_len=16, global_batch=4)
    assert "optimizer step" not in caplog.text and "repeated" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "many"}], seq_len=16, global_batch=4, total_tokens=200_000)
    assert "is repeated" in caplog.text and "schedule.max_epochs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "capped"}], seq_len=16, global_batch=4, total_tokens=200_000, max_epochs=20)
    assert "repeated" not in caplog.text and "total_tokens = " not in caplog.text
    with caplog.at_level(logging.WARNING, logger="framelm"):
        build(run, [{"kind": "frame", "name": "tiny"}], seq_len=4, global_batch=2, total_tokens=60)
    held = load_stages(run.path("schedule/tiny/stages.yaml"))["total_tokens"]
    assert abs(held - 60) > 3 and f"it holds {held:,} tokens for total_tokens = 60 (" in caplog.text


def test_two_phase_weight_on_a_source_without_training_documents_is_named():
    # math's documents are all held out: it is a source of the table, with no training tokens
    table = pa.table({"id": [f"d{i}" for i in range(6)], "source": ["web"] * 4 + ["math"] * 2, "quadrant": ["Q1"] * 6,
                      "split": ["train"] * 4 + ["heldout"] * 2, "n_tokens": pa.array([5] * 6, pa.int64())})
    builder = Builder(Corpus.from_table(table, FRAME_CELLS), ScheduleConfig(strategies=[]))
    by_source = StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"web": 1.0}, {"math": 0.5, "web": 0.5}]})
    with pytest.raises(FramelmError, match="source 'math' has weight but no training tokens"):
        builder.build(by_source)
    by_tier = dataclasses_replace(by_source, tiers={"math": "high", "web": "low"}, blends=[{"low": 1.0}, {"high": 0.5, "low": 0.5}])
    with pytest.raises(FramelmError, match=r"blends\[1\]: tier 'high' has weight but its sources \(math\) have no training tokens"):
        builder.build(by_tier)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0 / 0 for a weightless tier of such sources
        builder.build(dataclasses_replace(by_tier, blends=[{"low": 1.0}, {"high": 0.0, "low": 1.0}]))


def test_a_two_phase_blend_within_tolerance_of_one_fills_its_phase():
    # 2,000 documents of 10 tokens (+EOS): a blend summing to 0.9992 would leave ~18 tokens, about two
    # documents, of the run unfilled if it were not scaled to 1
    table = pa.table({"id": [f"d{i}" for i in range(2000)], "source": ["web", "math"] * 1000, "quadrant": ["Q1"] * 2000,
                      "split": ["train"] * 2000, "n_tokens": pa.array([10] * 2000, pa.int64())})
    builder = Builder(Corpus.from_table(table, FRAME_CELLS), ScheduleConfig(strategies=[]))
    exact = builder.build(StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"web": 0.5, "math": 0.5}] * 2}))
    short = builder.build(StrategyConfig.from_dict({"kind": "two_phase", "blends": [{"web": 0.4996, "math": 0.4996}] * 2}))
    assert [len(p.idx) for p in short.stages] == [len(p.idx) for p in exact.stages]


def test_a_window_too_small_for_its_documents_is_warned_about(caplog):
    from framelm.schedule import warn_about_thin_blends

    n = 100

    def stream_of(weight_a, weight_b):
        stages = [Stage("A", np.arange(n), np.zeros(n, np.int32), weight_a),
                  Stage("B", np.arange(n, 2 * n), np.zeros(n, np.int32), weight_b)]
        return assemble(stages, "logistic", window=0.1, steepness=10)

    even = np.full(n, 10, np.int64)  # half a window = 50 tokens: 5 documents a side
    assert stream_of(even, even).blends == [("A", "B", 5, 5)]
    long_last = even.copy()
    long_last[-1] = 400  # A's last document is longer than half the window: no blend at all
    stream = stream_of(long_last, even)
    assert stream.blends == [("A", "B", 0, 5)] and (stream.stage == np.repeat([0, 1], n)).all()
    with caplog.at_level(logging.WARNING, logger="framelm"):
        warn_about_thin_blends("frame", stream, ScheduleConfig())
        assert "schedule frame: logistic transition window of transition_window = 0.1" in caplog.text
        assert "fewer than 4 whole documents on a side" in caplog.text and "A -> B (0 + 5 documents)" in caplog.text
        caplog.clear()
        warn_about_thin_blends("frame", stream_of(even, even), ScheduleConfig())
    assert caplog.text == ""
