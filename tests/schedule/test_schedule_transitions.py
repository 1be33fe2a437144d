"""transitions.py: transition curves and the blending of stages into one stream."""

import numpy as np
import pytest

from framelm.schedule import Stage, assemble, transition_share


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
