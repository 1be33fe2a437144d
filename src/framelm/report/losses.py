"""The "Loss curves" section: training and held-out loss per schedule, mean over seeds, from
RUN/train/<name>/seed<k>/log.jsonl, with stage starts from RUN/export/<name>/stream/meta.json."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from framelm import fsutil, plots
from framelm.errors import FramelmError
from framelm.report.config import ReportConfig
from framelm.report.page import Image, Section, not_run
from framelm.report.records import number_field
from framelm.rundir import RunDir


def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 2:
        return values
    kernel = np.ones(min(window, len(values)))
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def _mean_over_seeds(series: list[dict[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Mean across seeds at each token count, and one standard error across seeds (None for one seed)."""
    tokens = np.array(sorted({t for s in series for t in s}))
    stack = np.full((len(series), len(tokens)), np.nan)
    index = {t: i for i, t in enumerate(tokens)}
    for k, s in enumerate(series):
        for t, v in s.items():
            stack[k, index[t]] = v
    n = np.sum(~np.isnan(stack), axis=0)
    mean = np.nansum(stack, axis=0) / n
    if len(series) == 1:
        return tokens, mean, None
    sq = np.nansum((stack - mean) ** 2, axis=0)
    band = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)) / np.sqrt(n), 0.0)
    return tokens, mean, band


def _read_log(path: Path) -> tuple[dict[float, float], dict[str, dict[float, float]]]:
    """Training loss and held-out losses by token count; a repeated step (resumed run) keeps the last value."""
    train: dict[float, float] = {}
    heldout: dict[str, dict[float, float]] = {}
    for line, rec in fsutil.read_log(path):
        where = f"{path}: line {line}"
        if rec.get("type") == "train":
            train[number_field(rec, "tokens", where)] = number_field(rec, "loss", where)
        elif rec.get("type") == "heldout":
            tokens = number_field(rec, "tokens", where)
            losses = rec.get("losses")
            if not isinstance(losses, dict):
                raise FramelmError(f"{where}: field 'losses' must be an object of held-out set -> loss, got {losses!r}")
            for key in losses:
                heldout.setdefault(str(key), {})[tokens] = number_field(losses, key, f"{where}, losses")
    return train, heldout


def _stage_starts(run: RunDir, schedule: str) -> list[float] | None:
    """Where the schedule's stages after the first begin, in stream tokens; None without an export."""
    path = run.path("export", schedule, "stream", "meta.json")
    if not path.is_file():
        return None
    stages = fsutil.read_json(path, f"re-run: framelm export --run-dir {run.root} --force").get("stages")
    if not isinstance(stages, list) or not all(isinstance(st, dict) for st in stages):
        raise FramelmError(f"{path}: field 'stages' must be a list of {{name, start_token, end_token}}")
    starts = [number_field(st, "start_token", f"{path}: stages[{i}]") for i, st in enumerate(stages)]
    return [t for t in starts if t > 0]


def _compared_train_keys(compare: tuple[Path, dict[str, Any]] | None) -> list[str] | None:
    """The training runs compare/results.json lists (None without one): the loss plots show only
    these, so an ad-hoc `framelm train --seed 1` is not averaged into a schedule compare ran once."""
    if compare is None:
        return None
    runs = compare[1].get("runs")
    keys = [r.get("train_key") for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []
    return list(dict.fromkeys(k for k in keys if isinstance(k, str) and k.startswith("train/")))


def loss_section(cfg: ReportConfig, run: RunDir, out: Path, palette: dict[str, str],
                  compare: tuple[Path, dict[str, Any]] | None = None) -> Section:
    title, anchor = "Loss curves", "loss"
    keys = _compared_train_keys(compare)
    if keys is None:
        logs = sorted(run.root.glob("train/*/seed*/log.jsonl"))
    else:
        logs = [p for p in (run.path(k, "log.jsonl") for k in keys) if p.is_file()]
    if not logs:
        what = "no train/*/seed*/log.jsonl" if keys is None else "no train/*/seed*/log.jsonl of the runs compare/results.json lists"
        return not_run(title, anchor, what, f"framelm compare --run-dir {run.root}")
    shown_runs = ", ".join(str(p.parent.relative_to(run.root)) for p in logs)
    runs_text = (f" Runs shown: {shown_runs} ("
                 + ("those compare/results.json lists; other training runs in the run directory are left out)"
                    if keys is not None else "every train/*/seed*/log.jsonl found: there is no compare/results.json)"))
    per_schedule: dict[str, list[tuple[dict[float, float], dict[str, dict[float, float]]]]] = {}
    for path in logs:
        per_schedule.setdefault(path.parent.parent.name, []).append(_read_log(path))
    schedules = sorted(per_schedule)
    exported = {s: _stage_starts(run, s) for s in schedules}
    starts = {s: v or [] for s, v in exported.items()}
    seeds = {s: len(v) for s, v in per_schedule.items()}

    def curves(pick) -> list[plots.Curve]:
        out_curves = []
        for s in schedules:
            series = [d for d in (pick(r) for r in per_schedule[s]) if d]
            if series:
                tokens, mean, band = _mean_over_seeds(series)
                shown = [b for b in starts[s] if b <= tokens[-1]]  # stages the run has reached
                out_curves.append(plots.Curve(f"{s} ({seeds[s]} seed{'s' * (seeds[s] > 1)})", palette[s],
                                              tokens, mean, band, shown))
        return out_curves

    window = cfg.train_loss_window

    def smoothed(r):
        train = r[0]
        if not train:
            return {}
        t = np.array(sorted(train))
        return dict(zip(t, _rolling_mean(np.array([train[x] for x in t]), window)))

    panels = [("training loss" + (f" (rolling mean of {window} logs)" if window > 1 else ""), "loss (nats/token)",
               curves(smoothed))]
    if any("all" in r[1] for v in per_schedule.values() for r in v):
        panels.append(("held-out loss, all held-out documents", "loss (nats/token)", curves(lambda r: r[1].get("all"))))
    panels = [p for p in panels if p[2]]
    section = Section(title, anchor)
    if not panels:
        section.missing = "the training logs hold no 'train' or 'heldout' records yet"
        return section
    many_seeds = any(n > 1 for n in seeds.values())
    band = " Shaded bands are one standard error across seeds." if many_seeds else ""
    if any(starts.values()):
        marks = " Dotted vertical lines (in each schedule's colour) mark where its stages begin."
    elif any(v is not None for v in exported.values()):
        marks = " No stage boundaries to mark: each exported schedule shown has a single stage."
    else:
        marks = " Stage boundaries are not shown: no export/&lt;schedule&gt;/stream/meta.json found."
    plots.curves(out / "loss.png", panels, cfg.dpi)
    section.images.append(Image(
        "loss.png",
        "Loss against training tokens, one line per schedule (mean over seeds); lower is better, and the held-out "
        "panel is the fair comparison because every schedule is scored on the same documents. Its held-out sets are "
        "the training loop's (capped at train.heldout_max_tokens_per_set tokens each), not the eval stage's, so its "
        "last points need not equal the comparison table's held-out loss." + band + marks
        + html.escape(runs_text)))

    detail_keys = sorted({k for v in per_schedule.values() for r in v for k in r[1] if k != "all"})
    if detail_keys:
        detail = [(f"held-out loss, {k}", "loss (nats/token)", curves(lambda r, k=k: r[1].get(k))) for k in detail_keys]
        plots.curves(out / "heldout-sets.png", detail, cfg.dpi, max_cols=3)
        section.images.append(Image(
            "heldout-sets.png",
            "Held-out loss on each source and each quadrant separately, one line per schedule: a set whose loss "
            "falls while its stage trains and rises after it shows how much the order, not only the data, matters."
            + band + html.escape(runs_text)))
    return section
