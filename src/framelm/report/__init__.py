"""`framelm report`: one self-contained HTML page about a run, with figures and tables.

Reads (each optional; a section whose inputs are missing says "not run yet" and names the
command that makes them):
    RUN/score/scores.parquet, RUN/partition/quadrants.parquet,      scores, their quadrant labels,
    RUN/partition/summary.json                                      cut points
    RUN/schedule/<name>/order.parquet, stages.yaml                  each schedule's composition
    RUN/train/<name>/seed<k>/log.jsonl                              training and held-out loss
    RUN/export/<name>/stream/meta.json                              stage boundaries in tokens
    RUN/compare/results.json                                        accuracies and the compare table
Writes:
    RUN/report/index.html        the page; images referenced by relative path, no scripts,
                                 no external CSS or fonts, so the folder can be copied anywhere
    RUN/report/*.png             figures (matplotlib, Agg)

Large tables (100 M documents) are aggregated out of core by DuckDB into histograms before
anything is plotted; the page only ever holds binned numbers.

Modules: `config` (ReportConfig, the input fingerprint), one per page section that reads its
inputs, draws its figures through `framelm.plots` and writes its captions and tables
(`quadrants`, `schedules`, `losses`, `comparison` for accuracy and the compare table),
`records` (checks on values read from JSON, YAML and log lines), `page` (the section type,
HTML fragments, the page layout); `build_report` here puts them together.
"""

from __future__ import annotations

from typing import Any

from framelm import fsutil, plots
from framelm.report.comparison import accuracy_section, compare_results, compare_section, run_label
from framelm.report.config import ReportConfig, finished_keys
from framelm.report.losses import loss_section
from framelm.report.page import render_page
from framelm.report.quadrants import partition_section
from framelm.report.schedules import schedule_section
from framelm.rundir import RunDir
from framelm.sql import connect

__all__ = ["ReportConfig", "build_report", "stale_notes"]


def stale_notes(run: RunDir) -> list[str]:
    """A caution per finished result that was made from an earlier result of a stage before it:
    the page would otherwise mix figures of different runs (a schedule of an old 3 x 2 grid
    beside the quadrants of the current 2 x 2) without a word."""
    from framelm.pipeline import stale_records

    return [f"out of date: {key} was made from an earlier result of {up} than the one now in the run, so its figures "
            f"and numbers do not belong with those of {up}; to make them agree, re-run {key} on the new {up} "
            f"(it was last made by: {run.command_for(key)}), or make {up} as it was (its new result was made by: "
            f"{run.command_for(up)})"
            for key, up in sorted(stale_records(run, finished_keys(run)))]


def build_report(cfg: ReportConfig, run: RunDir) -> dict[str, Any]:
    """Write RUN/report/index.html and its PNG figures from whatever the run holds so far."""
    out = run.stage_dir("report")
    for old in out.glob("*.png"):  # figures of sections that have since lost their inputs
        old.unlink()
    con = connect(cfg.memory_limit, cfg.threads)
    try:
        compare = compare_results(run)
        comparison, verdicts = compare_section(cfg, run, compare)
        # one colour per schedule on every figure that compares schedules
        names = {p.name for p in run.root.glob("train/*") if p.is_dir()}
        names |= {run_label(r) for r in (compare[1].get("runs", []) if compare else []) if isinstance(r, dict)}
        palette = {name: plots.colour(i) for i, name in enumerate(sorted(names))}
        sections = [
            partition_section(cfg, run, out, con),
            schedule_section(cfg, run, out, con),
            loss_section(cfg, run, out, palette, compare),
            accuracy_section(cfg, run, out, compare, palette),
            comparison,
        ]
    finally:
        con.close()
    title = cfg.title or f"framelm report: {run.root.name}"
    page = out / "index.html"
    stale = stale_notes(run)
    fsutil.write_text(page, render_page(title, run, sections, verdicts, stale))
    images = [img.file for s in sections for img in s.images]
    pending = [s.title for s in sections if s.missing]
    summary = f"report: {page} ({len(images)} figures" + (f"; not run yet: {', '.join(pending)})" if pending else ")")
    for line in (*verdicts, *stale):
        summary += "\n  " + line
    return {"figures": len(images), "sections": len(sections) - len(pending), "not_run_yet": len(pending), "out_of_date": len(stale),
            "summary": summary}
