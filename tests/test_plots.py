"""framelm.plots: helpers the report's figures share."""

import pytest


@pytest.mark.parametrize("lo, hi, expected", [(250.0, 2000.0, ["500", "1,000", "2,000"]), (1.5, 3e4, ["10", "100", "1,000", "10,000"])])
def test_log_ppl_axis_labels_are_plain_numbers_that_do_not_crowd(lo, hi, expected):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from framelm.plots import _plain_log_ticks

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis, lo, hi)
    ax.set_xlim(lo, hi)
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert shown == expected
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())  # matplotlib's 3x10^2, 4x10^2, ... are off
