"""Fixtures shared by the framelm.report tests; the run builders and helpers live in report_fixtures.py.

`full_report` is package-scoped: the full report is built once for every file of tests/report
that reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from framelm.pipeline import run_stage
from framelm.report import ReportConfig
from framelm.rundir import RunDir
from report_fixtures import make_run


@pytest.fixture(scope="package")
def full_report(tmp_path_factory) -> tuple[RunDir, dict]:
    """One report over a run with every stage's outputs, shared by the tests that only read it;
    "_figures" holds every Figure framelm.plots saved for it, by file name."""
    from framelm import plots

    figures: dict[str, object] = {}
    original = plots._save

    def save(fig, path, dpi):
        original(fig, path, dpi)
        figures[Path(path).name] = fig

    run = make_run(tmp_path_factory.mktemp("full") / "run")
    with pytest.MonkeyPatch.context() as mp:  # only while this report is built, not for the rest of the session
        mp.setattr(plots, "_save", save)
        counts = run_stage("report", ReportConfig(), run)
    return run, {**counts, "_figures": figures}
