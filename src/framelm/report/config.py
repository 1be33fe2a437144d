"""The report stage's config, and what it reads that decides whether it re-runs."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from framelm.config import StageConfig, field
from framelm.errors import ConfigError
from framelm.rundir import RunDir

# What the report reads, relative to the run directory; its fingerprint decides re-runs.
INPUT_PATTERNS = (
    "score/scores.parquet",
    "partition/quadrants.parquet",
    "partition/summary.json",
    "ingest/documents/part-*.parquet",  # the texts of the extreme-PPL documents
    "schedule/*/order.parquet",
    "schedule/*/stages.yaml",
    "train/*/seed*/log.jsonl",
    "export/*/stream/meta.json",
    "compare/results.json",
)


@dataclasses.dataclass
class ReportConfig(StageConfig):
    title: str = field("", help="page title; empty uses 'framelm report: <run directory name>'")
    verdict_metric: str = field("auto", help="compare-table metric the one-line verdicts are about; "
                                             "'auto' picks the overall held-out loss")
    significance_level: float = field(0.05, help="a difference counts as significant when the two-sided p-value "
                                                 "of its t test over seeds (compare's diff_p) is below this")
    accuracy_metric: Literal["acc", "acc_norm"] = field("acc", help="downstream metric plotted per task")
    schedule_groups: Literal["quadrant", "source"] = field("quadrant", help="what the schedule plots stack: "
                                                                           "quadrant or source shares")
    density_bins: int = field(80, help="most bins per axis of the PPL-PD density plot (fewer for small tables)")
    schedule_bins: int = field(200, help="most token bins along each schedule plot (fewer for short schedules: "
                                         "10 documents a bin on average)")
    train_loss_window: int = field(10, help="training-loss log entries in the centred rolling mean (1 = raw)")
    max_source_panels: int = field(8, help="largest sources (by documents) that get their own density panel")
    extreme_docs: int = field(10, help="highest- and lowest-PPL documents listed with the start of their text (0: none)")
    dpi: int = field(110, help="resolution of the PNG figures")
    memory_limit: str = field("2GB", help="DuckDB memory limit for aggregating large tables", hash=False)
    threads: int = field(2, help="DuckDB threads", hash=False)

    def validate(self) -> None:
        if not 0 < self.significance_level < 1:
            raise ConfigError(f"'significance_level' must lie strictly between 0 and 1, got {self.significance_level}")
        for key in ("density_bins", "schedule_bins"):
            if not 2 <= getattr(self, key) <= 2000:
                raise ConfigError(f"'{key}' must be between 2 and 2000, got {getattr(self, key)}")
        for key in ("train_loss_window", "dpi", "threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("max_source_panels", "extreme_docs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"'{key}' must be >= 0, got {getattr(self, key)}")

    def input_fingerprint(self, run: RunDir) -> dict[str, Any]:
        """Size and mtime of every input file, and which results are out of date (its cautions):
        the report re-runs when any of them changes."""
        from framelm.pipeline import stale_records

        out: dict[str, Any] = {}
        for pattern in INPUT_PATTERNS:
            for p in sorted(run.root.glob(pattern)):
                st = p.stat()
                out[str(p.relative_to(run.root))] = [st.st_size, st.st_mtime_ns]
        if stale := stale_records(run, finished_keys(run)):
            out["out_of_date"] = sorted(stale)
        return out


def finished_keys(run: RunDir) -> list[str]:
    return [k for k, rec in run.manifest()["stages"].items() if k != "report" and rec.get("status") == "done"]
