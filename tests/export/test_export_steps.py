"""Megatron and nanotron phases never ask a segment's dataset for more samples than one epoch of
it holds, at the edges: a segment of exactly global_batch * seq_len tokens, one more, and a
global batch of one against a segment of exactly seq_len tokens.

The trainers' sample counts are written here from their sources, independently of framelm:
- Megatron-Core's GPTDataset (megatron/core/datasets/gpt_dataset.py, helpers.cpp
  build_sample_idx) draws samples of seq_len + 1 tokens that share one token with the next
  (add_extra_token_to_sequence), so one epoch of T tokens holds (T - 1) // seq_len samples;
- datatrove's DatatroveFileDataset (datatrove/utils/dataset.py), which nanotron's Nanoset reads,
  cuts a .ds file of T tokens into T // (seq_len + 1) disjoint samples of seq_len + 1 tokens.
A step takes global_batch samples; more steps than an epoch feeds wrap into a second epoch of
the segment (repeated documents), and nanotron's Nanoset fails on a folder of no whole sample.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from export_fixtures import build_stage_run
from framelm.errors import FramelmError
from framelm.export import ExportConfig, export_schedules


def megatron_samples(n_tokens: int, seq_len: int) -> int:
    return (n_tokens - 1) // seq_len


def nanotron_samples(n_tokens: int, seq_len: int) -> int:
    return n_tokens // (seq_len + 1)


def _export(tiny, fmt):
    export_schedules(ExportConfig(formats=[fmt]), tiny.run)
    out = tiny.run.path("export", "frame", fmt)
    return out, json.loads((out / "phases.json").read_text())


def check_phases(tiny, fmt, seq_len, global_batch):
    """Every phase gets at least one step and exactly the whole steps one epoch of its own dataset
    (read from the files written) feeds; phases follow one another from step 0; every token of the
    stream is in exactly one dataset. Returns [(tokens, start_step, end_step)] per phase."""
    out, info = _export(tiny, fmt)
    phases = info["phases"]
    step, token, got = 0, 0, []
    for ph in phases:
        if fmt == "megatron":
            n_tokens = (out / f"{ph['folder']}.bin").stat().st_size // 2
            samples = megatron_samples(n_tokens, seq_len)
        else:
            n_tokens = (out / ph["folder"] / f"000_{ph['folder']}.ds").stat().st_size // 2
            samples = nanotron_samples(n_tokens, seq_len)
        steps = ph["end_step"] - ph["start_step"]
        assert n_tokens == ph["tokens"] == ph["end_token"] - ph["start_token"] and ph["start_token"] == token
        assert ph["start_step"] == step and steps >= 1
        assert steps * global_batch <= samples, f"{ph['folder']}: {steps} steps need more than its {samples} samples"
        assert samples < (steps + 1) * global_batch  # and no whole step is left out
        if fmt == "megatron":  # the trainer's exact need: steps * global_batch * seq_len + 1 tokens
            assert n_tokens >= steps * global_batch * seq_len + 1
        else:  # global_batch disjoint windows of seq_len + 1 tokens a step
            assert n_tokens >= steps * global_batch * (seq_len + 1)
        step, token = ph["end_step"], ph["end_token"]
        got.append((n_tokens, ph["start_step"], ph["end_step"]))
    assert token == len(tiny.expected_stream())
    if fmt == "megatron":
        assert [ph["samples"] for ph in phases] == [megatron_samples(n, seq_len) for n, _, _ in got]
    else:
        assert [ph["samples"] for ph in phases] == [nanotron_samples(n, seq_len) for n, _, _ in got]
    total = info["total_iterations"] if fmt == "megatron" else info["total_steps"]
    assert total == step
    assert info["stages"][0]["start_step"] == 0 and info["stages"][-1]["end_step"] == total
    if fmt == "nanotron":
        stages = yaml.safe_load((out / "data_stages.yaml").read_text())["data_stages"]
        assert [s["start_training_step"] for s in stages] == [ph["start_step"] + 1 for ph in phases]
    return got


@pytest.mark.parametrize("fmt", ["megatron", "nanotron"])
def test_a_segment_of_exactly_one_step_of_tokens_gets_no_step_it_cannot_feed(tmp_path, fmt):
    # seq_len 4, global batch 2: 8 tokens a step. S0 holds exactly 8, S1 one more (9), S2 17,
    # S3 16 (2 steps of stream position, 1 that Megatron can feed), S4 25
    tiny = build_stage_run(tmp_path / "run", [[8], [5, 4], [17], [10, 6], [25]], seq_len=4, global_batch=2)
    got = check_phases(tiny, fmt, seq_len=4, global_batch=2)
    if fmt == "megatron":
        # S0 (7 // 4 = 1 sample) joins S1: 17 tokens, 4 samples, 2 steps; S1 alone (9 tokens, 2 samples)
        # would have fed exactly one step; 16 tokens feed one step of (16 - 1) // 4 = 3 samples
        assert got == [(17, 0, 2), (17, 2, 4), (16, 4, 5), (25, 5, 8)]
    else:
        # 5 tokens a sample: S0 and S1 (1 sample each) join, 17 tokens give 3 samples, one step
        assert got == [(17, 0, 1), (17, 1, 2), (16, 2, 3), (25, 3, 5)]


@pytest.mark.parametrize("fmt", ["megatron", "nanotron"])
def test_a_segment_of_exactly_one_more_token_than_a_step(tmp_path, fmt):
    # S0: 9 tokens, exactly what one Megatron step of 2 samples of 4 + 1 tokens sharing one needs;
    # S2: 8 tokens joins its shorter neighbour S1 (17 -> 25: 3 Megatron steps, exactly); S3: 24
    tiny = build_stage_run(tmp_path / "run", [[9], [17], [8], [24]], seq_len=4, global_batch=2)
    got = check_phases(tiny, fmt, seq_len=4, global_batch=2)
    if fmt == "megatron":
        assert got == [(9, 0, 1), (25, 1, 4), (24, 4, 6)]
    else:
        # disjoint samples need 10 tokens a step: S2 joins S1 (25 tokens, 5 samples), then S0 (9, one
        # sample) joins them: 34 tokens, 6 samples, 3 steps
        assert got == [(34, 0, 3), (24, 3, 5)]


@pytest.mark.parametrize("fmt", ["megatron", "nanotron"])
def test_a_global_batch_of_one_and_a_segment_of_exactly_seq_len_tokens(tmp_path, fmt):
    # global batch 1, seq_len 4: S0 and S3 hold exactly 4 tokens, no whole sample of 4 + 1 (Megatron
    # would read one sample across two epochs of S0; nanotron's Nanoset would divide by zero)
    tiny = build_stage_run(tmp_path / "run", [[4], [5], [10], [4]], seq_len=4, global_batch=1)
    got = check_phases(tiny, fmt, seq_len=4, global_batch=1)
    if fmt == "megatron":
        assert got == [(9, 0, 2), (14, 2, 5)]  # (9 - 1) // 4 = 2 samples, (14 - 1) // 4 = 3
    else:
        assert got == [(9, 0, 1), (14, 1, 3)]  # 9 // 5 = 1 sample, 14 // 5 = 2


@pytest.mark.parametrize("fmt, tokens, words", [
    ("megatron", 8, "Megatron would train 0 iterations"), ("nanotron", 9, "nanotron would get no data stage")])
def test_a_stream_of_one_step_of_tokens_too_few_for_the_trainer_is_refused(tmp_path, fmt, tokens, words):
    # 8 (Megatron) or 9 (nanotron) tokens: at least one step of global_batch * seq_len, but fewer than the 9 / 10 each needs
    tiny = build_stage_run(tmp_path / "run", [[tokens]], seq_len=4, global_batch=2)
    with pytest.raises(FramelmError, match=words):
        export_schedules(ExportConfig(formats=[fmt]), tiny.run)


def test_the_tiny_run_phases_fit_their_datasets(tiny_run):
    # the shared fixture's interleaved schedule: transition slices of about one step each
    for fmt in ("megatron", "nanotron"):
        check_phases(tiny_run, fmt, seq_len=8, global_batch=2)
    _, info = _export(tiny_run, "megatron")
    assert np.all(np.diff([ph["start_token"] for ph in info["phases"]]) > 0)
