"""The fault harness itself: it passes a stage that follows the rules and catches one that
writes a file in two halves under its final name."""

import sys
from pathlib import Path

import pytest

from .harness import assert_same_outputs, kill_and_resume, run_uninterrupted

TOY = str(Path(__file__).with_name("toy_stage.py"))


def toy_argv(run_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, TOY, "toy", "--run-dir", str(run_dir), "--quiet", *flags]


def started_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Two run directories as `framelm ingest` starts them (the CLI refuses one without a manifest)."""
    for name in ("ref", "run"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text('{"stages": {}}\n')
    return tmp_path / "ref", tmp_path / "run"


def test_harness_passes_an_atomic_sharded_stage(tmp_path):
    ref, run = started_runs(tmp_path)
    run_uninterrupted(toy_argv(ref), ref)
    report = kill_and_resume(toy_argv(run), run, ref, seed=0, kill_points=2)
    assert report.landed, f"no kill landed mid-work: {report}"
    assert_same_outputs(run, ref, "toy")


def test_harness_catches_a_file_written_in_halves(tmp_path):
    ref, run = started_runs(tmp_path)
    run_uninterrupted(toy_argv(ref, "--no-atomic"), ref)
    with pytest.raises(AssertionError, match="visible under its final name but not valid JSON"):
        kill_and_resume(toy_argv(run, "--no-atomic"), run, ref, seed=0, kill_points=2)
