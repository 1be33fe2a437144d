"""The sections made from RUN/compare/results.json: "Downstream accuracy" and the "Comparison
table" with the one-line verdicts against random."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from framelm import fsutil, plots
from framelm.errors import ConfigError, FramelmError
from framelm.report.config import ReportConfig
from framelm.report.page import Image, Section, caution, count_text, fmt_number, not_run, html_table
from framelm.report.records import is_number
from framelm.rundir import RunDir

# Below this many questions a task's accuracy has a sampling error above ~2 points, more than the
# differences between curricula of small proxy models (FRAME's gains are a few points).
FEW_QUESTIONS = 500


def compare_results(run: RunDir) -> tuple[Path, dict[str, Any]] | None:
    path = run.path("compare", "results.json")
    if not path.is_file():
        return None
    data = fsutil.read_json(path, f"re-run: framelm compare --run-dir {run.root} --force")
    for key in ("runs", "table"):
        if not isinstance(data.get(key, []), list):
            raise FramelmError(f"{path}: field '{key}' must be a list, got {type(data[key]).__name__}")
    return path, data


def run_label(row: dict[str, Any]) -> str:
    """A compare run's or row's name, e.g. frame, or frame+ema for checkpoint-averaged weights (a
    file from before averaged weights were evaluated has no "weights")."""
    from framelm.compare import FINAL, label

    return label(str(row.get("schedule")), str(row.get("weights") or FINAL))


def accuracy_section(cfg: ReportConfig, run: RunDir, out: Path, compare: tuple[Path, dict[str, Any]] | None,
                      palette: dict[str, str]) -> Section:
    title, anchor = "Downstream accuracy", "accuracy"
    if compare is None:
        return not_run(title, anchor, "no compare/results.json", f"framelm compare --run-dir {run.root}")
    path, data = compare
    metric = cfg.accuracy_metric
    values: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    questions: dict[str, int] = {}  # per task, the fewest questions any run was scored on
    for r in data.get("runs", []):
        results = r.get("results") if isinstance(r, dict) else None
        tasks = results.get("tasks") if isinstance(results, dict) else None
        for task, m in (tasks if isinstance(tasks, dict) else {}).items():
            if isinstance(m, dict) and isinstance(m.get(metric), (int, float)):
                err = m.get(f"{metric}_stderr")
                values.setdefault((task, run_label(r)), []).append(
                    (float(m[metric]), float(err) if isinstance(err, (int, float)) else None))
                if isinstance(m.get("n"), int):
                    questions[task] = min(questions.get(task, m["n"]), m["n"])
    section = Section(title, anchor)
    if not values:
        section.missing = f"not run yet: {html.escape(str(path))} has no downstream task results with '{metric}'"
        return section
    tasks = sorted({t for t, _ in values})
    schedules = [s for s in data.get("schedules", []) if any((t, s) in values for t in tasks)]
    schedules += sorted({s for _, s in values} - set(schedules))
    mean = np.full((len(tasks), len(schedules)), np.nan)
    err = np.full_like(mean, np.nan)
    for (task, schedule), v in values.items():
        i, k = tasks.index(task), schedules.index(schedule)
        accs = np.array([a for a, _ in v])
        mean[i, k] = accs.mean()
        if len(v) > 1:
            err[i, k] = accs.std(ddof=1) / math.sqrt(len(v))
        elif v[0][1] is not None:
            err[i, k] = v[0][1]
    n_seeds = max(len(v) for v in values.values())
    plots.accuracy_bars(out / "accuracy.png", tasks, schedules, [palette[s] for s in schedules], mean, err, metric,
                        cfg.dpi)
    what = ("one standard error across seeds" if n_seeds > 1
            else "the evaluation's own standard error (one seed: sampling of the task's questions only)")
    section.images.append(Image(
        "accuracy.png", f"Downstream {metric} per task (higher is better), one bar per schedule; error bars are {what}, "
                        f"so bars whose error bars overlap are not clearly different."
                        + (" Questions per task: " + ", ".join(f"{html.escape(t)} {questions[t]:,}" for t in tasks if t in questions)
                           + "." if questions else "")))
    few = [t for t in tasks if questions.get(t, FEW_QUESTIONS) < FEW_QUESTIONS]
    if few:
        section.blocks.append(caution(
            "caution: " + ", ".join(f"{t} ({questions[t]:,} questions)" for t in few)
            + f" {'was' if len(few) == 1 else 'were'} scored on fewer than {FEW_QUESTIONS:,} questions; an accuracy near "
              f"50 % then has a sampling error of about ±{50 / math.sqrt(min(questions[t] for t in few)):.0f} points, "
              f"more than schedules usually differ by, so these bars cannot rank schedules"))
    return section


def _lower_is_better(metric: str) -> bool:
    m = metric.lower()
    return any(k in m for k in ("loss", "bpb", "perplexity", "ppl", "heldout")) and "acc" not in m


def _is_overall_heldout_loss(metric: str) -> bool:
    """Whether a compare-table metric is the held-out loss over all held-out documents."""
    return "heldout" in metric and metric.endswith("/all") and "bpb" not in metric


def _pick_verdict_metric(cfg: ReportConfig, metrics: list[str], path: Path) -> str | None:
    if cfg.verdict_metric != "auto":
        if cfg.verdict_metric not in metrics:
            raise ConfigError(f"'verdict_metric' = {cfg.verdict_metric!r} is not a metric of {path}; "
                              f"choose one of: {', '.join(metrics)} (or 'auto')")
        return cfg.verdict_metric
    overall = [m for m in metrics if _is_overall_heldout_loss(m)]
    return next(iter(overall + [m for m in metrics if "loss" in m] + metrics), None)


def _p_text(p: float, name: str = "p") -> str:
    return f"{name} < 0.001" if p < 0.001 else f"{name} = {p:.3f}" if p < 0.01 else f"{name} = {p:.2f}"


def _significant(cfg: ReportConfig, row: dict[str, Any]) -> bool | None:
    """Whether a row's difference to random is significant; None where the table gives no p-value
    (the baseline, one seed, no spread, or a results.json from before compare wrote diff_p)."""
    p = row.get("diff_p")
    return p < cfg.significance_level if is_number(p) else None


def holm_adjusted(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment: p-values that keep the chance of any false "significant" among
    len(ps) tests at the level, as each alone keeps its own (the i-th smallest is multiplied by
    len(ps) - i, and no adjusted value falls below a smaller p's)."""
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(sorted(range(len(ps)), key=ps.__getitem__)):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def _tested(table: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The rows of `metric` whose difference to random has a t test: the verdict's family of claims."""
    return [r for r in table if r.get("metric") == metric and r.get("schedule") != "random"
            and all(is_number(r.get(k)) for k in ("diff_vs_random", "diff_stderr", "diff_p"))]


def verdict_lines(cfg: ReportConfig, table: list[dict[str, Any]], metric: str) -> list[str]:
    """One line per schedule (and weights) against random on `metric`. With several of them, each
    is one of several claims: significance is then judged on Holm-adjusted p-values."""
    lower = _lower_is_better(metric)
    label = "held-out loss" if _is_overall_heldout_loss(metric) else metric
    unit = " bits/byte" if "bpb" in metric else (" nats" if "loss" in metric else "")
    rows = [r for r in table if r.get("metric") == metric]
    seeds = {run_label(r): r.get("n_seeds") for r in rows}
    tested = _tested(table, metric)
    adjusted = dict(zip(map(run_label, tested), holm_adjusted([r["diff_p"] for r in tested])))
    out = []
    for row in rows:
        diff, se, p = row.get("diff_vs_random"), row.get("diff_stderr"), row.get("diff_p")
        if row.get("schedule") == "random" or not is_number(diff):
            continue
        name, baseline = run_label(row), run_label({**row, "schedule": "random"})
        direction = "better" if (diff < 0) == lower else "worse"
        text = f"{name} vs {baseline}: {label} {diff:+.3f}"
        if not is_number(se):
            text += f"{unit} (no standard error with {row.get('n_seeds', 1)} seed(s): no significance claim)"
        elif "diff_p" not in row:
            text += (f" ± {se:.3f}{unit} ({direction}; no p-value: this results.json predates compare's t test, "
                     f"re-run framelm compare to re-tabulate: no significance claim)")
        elif not is_number(p):
            text += f" ± {se:.3f}{unit} ({direction}; no spread across seeds, no t test: no significance claim)"
        else:
            test = (f"paired t test over {row.get('n_seeds')} seeds" if row.get("diff_paired") else
                    f"Welch t test over {row.get('n_seeds')} and {seeds.get(baseline, 'n/a')} seeds")
            adj = adjusted[name]  # p itself when it is the only claim
            verdict = "significant" if adj < cfg.significance_level else "not significant"
            holm = f", {_p_text(adj, 'Holm-adjusted')} for {len(tested)} comparisons" if len(tested) > 1 else ""
            text += f" ± {se:.3f}{unit} ({direction}, {verdict}: {_p_text(p)}{holm}, {test})"
        out.append(text)
    return out


def compare_section(cfg: ReportConfig, run: RunDir, compare: tuple[Path, dict[str, Any]] | None) -> tuple[Section, list[str]]:
    title, anchor = "Comparison table", "compare"
    if compare is None:
        return not_run(title, anchor, "no compare/results.json", f"framelm compare --run-dir {run.root}"), []
    path, data = compare
    table = [r for r in data.get("table", []) if isinstance(r, dict)]
    section = Section(title, anchor)
    if not table:
        section.missing = f"not run yet: {html.escape(str(path))} has an empty 'table'"
        return section, []
    metrics = list(dict.fromkeys(str(r.get("metric")) for r in table))
    metric = _pick_verdict_metric(cfg, metrics, path)
    verdicts = verdict_lines(cfg, table, metric) if metric else []
    if not verdicts:
        verdicts = [f"no verdict: {path} has no difference against 'random' for {metric} "
                    f"(was 'random' among the compared schedules?)"]
    # compare imports torch: only with a result
    from framelm.compare import documents_note, heldout_notes, near_unigram_floor, non_finite_note, unigram_note

    for note in (non_finite_note(data), documents_note(data)):
        if note:
            section.blocks.append(caution(note))
            verdicts.append(note)
    sizes = data.get("heldout_sets")
    unigram = data.get("unigram_heldout_loss") if isinstance(data.get("unigram_heldout_loss"), dict) else {}
    if isinstance(sizes, dict) and sizes:
        rows = [[html.escape(str(name)), count_text(size.get("docs")), count_text(size.get("tokens")),
                 *([fmt_number(unigram.get(name))] if unigram else [])]
                for name, size in sizes.items() if isinstance(size, dict)]
        section.blocks.append(html_table(
            ["held-out set", "documents", "tokens", *(["unigram model's loss"] if unigram else [])], rows,
            "The held-out sets the held-out rows (and a held-out verdict) are measured on"
            + ("; a unigram model of the training documents' tokens (add-one smoothed) has the loss given: a "
               "model must be well below it to have learned more than token frequencies" if unigram else "")))
    for line in heldout_notes(data, None):
        section.blocks.append(caution(line))
    floor = unigram_note(data)
    if floor:
        if near_unigram_floor(data):
            section.blocks.append(caution(floor))
            if metric and metric.startswith("heldout_"):  # a task verdict does not read held-out loss
                verdicts.append(floor)
        else:
            section.blocks.append(f"<p>{html.escape(floor[0].upper() + floor[1:])}.</p>")
    if metric:
        verdicts.extend(heldout_notes({**data, "quadrants_without_heldout": None}, metric))
    level = cfg.significance_level
    with_items = any(isinstance(r.get("item_stderr"), (int, float)) for r in table)
    body = []
    for r in table:
        mean, se, diff, dse = (r.get(x) for x in ("mean", "stderr", "diff_vs_random", "diff_stderr"))
        baseline = r.get("schedule") == "random"
        significant = _significant(cfg, r)
        row = [html.escape(str(r.get("metric"))), html.escape(run_label(r)), f"{fmt_number(mean)} ± {fmt_number(se)}"]
        if with_items:
            row.append(fmt_number(r.get("item_stderr")))
        row += [html.escape(str(r.get("n_seeds", "n/a"))),
                "" if baseline else f"{fmt_number(diff)} ± {fmt_number(dse)}",
                "" if baseline else fmt_number(r.get("diff_p"), 2),
                "" if significant is None else "yes" if significant else "no"]
        body.append(row)
    header = ["metric", "schedule", "mean ± stderr (seeds)", *(["stderr (items)"] if with_items else []),
              "seeds", "difference vs random ± stderr", "p (t test)", f"significant (p < {level:g})"]
    section.blocks.append(html_table(
        header, body, "Mean across seeds ± its standard error over seeds (n/a with one seed)"
                      + ("; stderr (items) is the evaluation's own sampling error over the task's questions" if with_items else "")
                      + "; differences are to random with the same weights (frame+ema against random+ema), paired by "
                        "seed where seeds match; p is the two-sided p-value of a t test over seeds (paired, else "
                        "Welch's), n/a where it has none (one seed, or no spread), so no significance claim there."
                      + (" Each row's p is its own: over many rows some fall below the level by chance alone; the "
                         "verdict above adjusts its p-values for the number of comparisons it makes (Holm)."
                         if metric and len(_tested(table, metric)) > 1 else "")))
    return section, verdicts
