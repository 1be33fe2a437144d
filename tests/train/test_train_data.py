import numpy as np
import pytest

from framelm.errors import FramelmError
from framelm.tokenstore import StageRange
from framelm.train.data import IGNORE, BatchPlan, read_stream, stream_fingerprint

STAGES = [StageRange("Q3", 0, 400), StageRange("Q4", 400, 1000)]
TOKENS = np.arange(1000, dtype=np.uint16)


def test_steps_consume_the_stream_in_order_with_stage_labels():
    plan = BatchPlan(TOKENS, STAGES, seq_len=10, global_batch_seqs=4, max_tokens=800)
    assert plan.n_steps == 20
    seen = []
    for step in range(plan.n_steps):
        x, y = plan.rows(step, 0, 4)
        assert np.array_equal(y[:, :-1], x[:, 1:])  # targets are the next tokens
        seen.append(x.ravel())
        assert plan.stage_of_step(step) == ("Q3" if step * 40 < 400 else "Q4")
    assert np.array_equal(np.concatenate(seen), np.arange(800))


def test_ranks_read_their_slices_of_each_step():
    plan = BatchPlan(TOKENS, STAGES, seq_len=10, global_batch_seqs=4)
    whole, _ = plan.rows(3, 0, 4)
    rank0, _ = plan.rows(3, 0, 2)
    rank1, _ = plan.rows(3, 2, 2)
    assert np.array_equal(np.concatenate([rank0, rank1]), whole)


def test_the_last_target_past_the_stream_is_ignored():
    plan = BatchPlan(TOKENS, STAGES, seq_len=10, global_batch_seqs=4)
    assert plan.n_steps == 25
    _, y = plan.rows(24, 0, 4)
    assert y[-1, -1] == IGNORE
    assert (y[:-1] != IGNORE).all() and (y[-1, :-1] != IGNORE).all()


def test_shuffle_window_never_crosses_a_stage_and_is_seeded():
    a = BatchPlan(TOKENS, STAGES, seq_len=10, global_batch_seqs=2, shuffle_window_seqs=8, seed=1)
    b = BatchPlan(TOKENS, STAGES, seq_len=10, global_batch_seqs=2, shuffle_window_seqs=8, seed=1)
    assert np.array_equal(a.row_order, b.row_order)
    assert not np.array_equal(a.row_order, np.arange(len(a.row_order)))
    assert sorted(a.row_order) == list(range(100))
    # rows 0-39 are stage Q3 (tokens < 400): they stay among themselves, in windows of 8
    assert set(a.row_order[:40]) == set(range(40))
    for w in range(0, 40, 8):
        assert set(a.row_order[w: w + 8]) == set(range(w, w + 8))


def test_steps_read_the_shuffled_rows_and_windows_restart_at_a_stage_boundary():
    # seq_len 7: rows 0-57 start below token 400 (stage Q3), rows 58-141 in Q4; windows of 5
    plan = BatchPlan(TOKENS, STAGES, seq_len=7, global_batch_seqs=2, shuffle_window_seqs=5, seed=3)
    read = np.concatenate([plan.rows(step, 0, 2)[0][:, 0] // 7 for step in range(plan.n_steps)])
    assert np.array_equal(read, plan.row_order) and not np.array_equal(read, np.arange(len(read)))
    windows = [range(w, min(w + 5, 58)) for w in range(0, 58, 5)] + [range(w, min(w + 5, 142)) for w in range(58, 142, 5)]
    for window in windows:
        assert set(read[window.start: window.stop]) == set(window)
    assert [plan.stage_of_step(s) for s in range(plan.n_steps)] == ["Q3" if 2 * s < 58 else "Q4" for s in range(plan.n_steps)]


def test_budget_errors_are_clear():
    with pytest.raises(FramelmError, match="exceeds"):
        BatchPlan(TOKENS, STAGES, seq_len=10, global_batch_seqs=4, max_tokens=2000)
    with pytest.raises(FramelmError, match="smaller than one step"):
        BatchPlan(TOKENS, STAGES, seq_len=100, global_batch_seqs=32)


def test_fingerprint_depends_on_content_and_stages():
    base = stream_fingerprint(TOKENS, STAGES)
    changed = TOKENS.copy()
    changed[500] += 1
    assert stream_fingerprint(changed, STAGES) != base
    assert stream_fingerprint(TOKENS, [StageRange("all", 0, 1000)]) != base
    assert stream_fingerprint(TOKENS.copy(), STAGES) == base


def test_read_stream_names_the_bad_file(tmp_path):
    TOKENS.tofile(tmp_path / "tokens.bin")
    (tmp_path / "meta.json").write_text('{"dtype": "uint16", "n_tokens": 999, "eos_id": 0, "vocab_size": 1000, "stages": []}')
    with pytest.raises(FramelmError, match="meta.json says n_tokens = 999"):
        read_stream(tmp_path)
    (tmp_path / "meta.json").write_text('{"dtype": "uint16", "n_tokens": 1000, "eos_id": 0, "vocab_size": 1000}')
    with pytest.raises(FramelmError, match="missing key 'stages'"):
        read_stream(tmp_path)
