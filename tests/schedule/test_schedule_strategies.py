"""strategies.py: each strategy kind's stages, budgets and epochs; the yaml schedule file."""

import warnings
from collections import Counter
from dataclasses import replace as dataclasses_replace

import numpy as np
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framelm.errors import ConfigError, FramelmError
from framelm.schedule import Builder, Corpus, ScheduleConfig, StrategyConfig, assemble, read_yaml_schedule
from schedule_fixtures import FRAME_CELLS, make_corpus, random_corpus, write_yaml


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


def test_cells_select_a_band_and_fill_the_budget_from_it():
    # Q1: 10 docs x 9 tokens (+EOS) = 100, Q2: 100, Q3: 200 tokens (20 docs), Q4: 100
    corpus = make_corpus([9] * 60, ["Q1"] * 10 + ["Q2"] * 10 + ["Q3"] * 20 + ["Q4"] * 20,
                         ["web"] * 40 + ["math"] * 20)
    builder = Builder(corpus, ScheduleConfig(strategies=[]))  # total_tokens: one pass over all 600 tokens
    for kind in ("frame", "random", "sorted", "ppl_two_stage"):
        sched = builder.build(StrategyConfig(kind=kind, cells=["Q3", "Q1"], column="n_tokens"))
        idx = np.concatenate([st.idx for st in sched.stages])
        kept = {corpus.cell_names[c] for c in corpus.cell[idx]}
        assert kept == {"Q1", "Q3"}, kind
        # the same 600 tokens as every other schedule, drawn from the 300 of Q1 and Q3: each twice
        assert corpus.weight[idx].sum() == 600 and Counter(Counter(idx.tolist()).values()) == {2: 30}, kind
        assert sched.pool_tokens == {"math": 0, "web": 300}, kind  # Q1 and Q3 hold web documents only
    assert [st.name for st in builder.build(StrategyConfig(kind="frame", cells=["Q1", "Q3"])).stages] == ["Q3", "Q1"]
    assert [st.name for st in builder.build(StrategyConfig(kind="pd_two_stage", cells=["Q3", "Q4"])).stages] == ["low_pd", "high_pd"]
    with pytest.raises(ConfigError, match=r"the cells it keeps \(Q3, Q4\) hold no low-PPL documents .*low_ppl stage would be empty"):
        builder.build(StrategyConfig(kind="ppl_two_stage", cells=["Q3", "Q4"]))
    # without `cells`, every cell: the schedule is the one built before `cells` existed
    whole, every = builder.build(StrategyConfig(kind="frame")), builder.build(StrategyConfig(kind="frame", cells=["Q1", "Q2", "Q3", "Q4"]))
    assert all((a.idx == b.idx).all() and (a.epoch == b.epoch).all() for a, b in zip(whole.stages, every.stages))


def test_a_permutation_of_selected_cells_names_exactly_them():
    corpus = random_corpus()
    builder = Builder(corpus, ScheduleConfig(strategies=[]))
    sched = builder.build(StrategyConfig(kind="permutation", cells=["Q2", "Q4"], order=["Q2", "Q4"]))
    assert [st.name for st in sched.stages] == ["Q2", "Q4"]
    with pytest.raises(ConfigError, match=r"'order' names a cell outside 'cells' 'Q1'; cells: Q2, Q4"):
        builder.build(StrategyConfig(kind="permutation", cells=["Q2", "Q4"], order=["Q1", "Q2", "Q4"]))
    with pytest.raises(ConfigError, match=r"'order' must name every non-empty cell it keeps once \(Q2, Q4\); missing: \['Q4'\]"):
        builder.build(StrategyConfig(kind="permutation", cells=["Q2", "Q4"], order=["Q2"]))


def test_bad_cell_selections_are_named():
    corpus = make_corpus([9] * 20, ["Q1"] * 10 + ["Q3"] * 10, ["web"] * 20)
    builder = Builder(corpus, ScheduleConfig(strategies=[]))
    with pytest.raises(ConfigError, match=r"'cells' names unknown cell 'P1D1'; cells: Q1, Q2, Q3, Q4"):
        builder.build(StrategyConfig(kind="random", cells=["P1D1"]))
    with pytest.raises(FramelmError, match=r"the cells it keeps \(Q2, Q4\) hold no training documents; non-empty cells: Q1, Q3"):
        builder.build(StrategyConfig(kind="random", cells=["Q2", "Q4"]))
    with pytest.raises(ConfigError, match="'cells' names 'Q1' twice"):
        StrategyConfig(kind="frame", cells=["Q1", "Q1"]).validate()
    with pytest.raises(ConfigError, match="a yaml strategy draws from sources .*through its stages' mix"):
        StrategyConfig(kind="yaml", path="x.yaml", cells=["Q1"]).validate()
    with pytest.raises(ConfigError, match="'cells' selects partition cells .*a two_phase strategy"):
        StrategyConfig(kind="two_phase", blends=[{"web": 1}, {"web": 1}], cells=["Q1"]).validate()


def test_epoch_caps_count_the_repeats_of_a_selection():
    corpus = make_corpus([9] * 40, ["Q1"] * 10 + ["Q3"] * 30, ["web"] * 10 + ["math"] * 30)
    builder = Builder(corpus, ScheduleConfig(strategies=[], max_epochs=2))
    builder.build(StrategyConfig(kind="random", cells=["Q3"]))  # 400 tokens from Q3's 300: 1.33 epochs
    with pytest.raises(FramelmError, match=r"source 'web' needs 4 epochs but at most 2 are allowed"):
        builder.build(StrategyConfig(kind="random", cells=["Q1"]))
