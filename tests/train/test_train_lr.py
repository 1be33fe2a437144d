import math

import pytest

from framelm.train.lr import lr_at

PEAK = 1e-3


def curve(schedule, steps=100, **kw):
    kw = {"warmup_fraction": 0.1, "final_ratio": 0.1, **kw}
    return [lr_at(s, steps, PEAK, schedule, **kw) for s in range(steps)]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_linear_warmup_reaches_the_peak(schedule):
    lrs = curve(schedule)
    assert lrs[:10] == pytest.approx([PEAK * (s + 1) / 10 for s in range(10)])
    assert lrs[9] == pytest.approx(PEAK)


def test_cosine_decays_monotonically_to_the_final_ratio():
    lrs = curve("cosine", final_ratio=1 / 3)
    assert lrs[-1] == pytest.approx(PEAK / 3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    mid = 10 + (99 - 10) // 2  # halfway through the decay: midway between peak and final
    assert lrs[mid] == pytest.approx((PEAK + PEAK / 3) / 2, rel=0.02)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_has_warmup_stable_and_decay_phases(shape):
    lrs = curve("wsd", wsd_decay_fraction=0.2, wsd_decay_shape=shape)
    assert lrs[10:80] == [PEAK] * 70  # stable phase
    assert lrs[-1] == pytest.approx(0.1 * PEAK)
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    progress = 10 / 20  # step 89 is the 10th of 20 decay steps
    drop = progress if shape == "linear" else math.sqrt(progress)
    assert lrs[89] == pytest.approx(PEAK - 0.9 * PEAK * drop)


def test_constant_and_no_warmup():
    assert curve("constant", warmup_fraction=0.0) == [PEAK] * 100
    assert curve("cosine", warmup_fraction=0.0)[0] == pytest.approx(PEAK)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.parametrize("steps, warmup_fraction", [(10, 0.9), (3, 0.5), (2, 0.5), (3, 0.9), (10, 1.0)])
def test_a_warmup_up_to_the_last_step_still_ends_at_the_final_ratio(schedule, steps, warmup_fraction):
    lrs = curve(schedule, steps=steps, warmup_fraction=warmup_fraction, wsd_decay_fraction=0.1)
    assert lrs[-2] == pytest.approx(PEAK)  # the warmup's last step
    assert lrs[-1] == pytest.approx(0.1 * PEAK)
