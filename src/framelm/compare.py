"""`framelm compare`: train and evaluate one model per (schedule, seed), then tabulate.

Every run is the `train` stage and then the `eval` stage, each through
`framelm.pipeline.run_stage`, so a finished run is skipped and an interrupted one resumes.
All runs share one TrainConfig template (only `schedule` and `seed` differ), so model, token
budget and learning-rate schedule are the same; the token count each run actually trained on
is read back from its record and must agree across runs.

The table gives, per metric and schedule, the mean over seeds and its standard error (sample
standard deviation / sqrt(seeds); null with one seed, as one seed says nothing about seed
variance), and the difference to `random` with its standard error: paired by seed when both
schedules have the metric for the same seeds, else the two means' standard errors combined.
`item_stderr` is the evaluation's own standard error over task items (mean over seeds), so a
single-seed comparison still shows how much the accuracies could move with other items.

`same_documents` says whether the schedules hold the same multiset of documents (from their
order.parquet); with a token budget below the stream length each run trains on a prefix.

Reads: RUN/train/<schedule>/seed<k>/ records, RUN/eval/<schedule>/seed<k>/results.json,
RUN/schedule/<schedule>/order.parquet (which documents each schedule holds).
Writes: RUN/compare/results.json, RUN/compare/results.csv.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from typing import Any

from framelm import fsutil
from framelm.config import ConfigError, StageConfig, field
from framelm.errors import FramelmError
from framelm.evaluate import EvalConfig
from framelm.pipeline import run_stage
from framelm.rundir import RunDir
from framelm.train import TrainConfig

BASELINE = "random"
TABLE_COLUMNS = ("metric", "schedule", "mean", "stderr", "n_seeds", "item_stderr", "diff_vs_random", "diff_stderr")
TASK_METRICS = ("acc", "acc_norm", "perplexity")
VARIES = ("schedule", "seed")  # the only TrainConfig fields that may differ between compared runs


@dataclasses.dataclass
class CompareConfig(StageConfig):
    schedules: list[str] = field(default_factory=lambda: ["frame", BASELINE],
                                 help="exported schedules to train on; 'random' is the baseline differences are taken to")
    seeds: list[int] = field(default_factory=lambda: [0], help="training seeds; each schedule is trained once per seed")
    train: TrainConfig = field(default_factory=TrainConfig, help="training settings shared by every run "
                               "(its schedule and seed are set per run)")
    eval: EvalConfig = field(default_factory=EvalConfig, help="evaluation settings shared by every run "
                             "(its model and name are set per run; seq_len defaults to train.seq_len)")

    def validate(self) -> None:
        if not self.schedules or len(set(self.schedules)) != len(self.schedules):
            raise ConfigError(f"'schedules' = {self.schedules} must list at least one schedule, each once")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"'seeds' = {self.seeds} must list at least one seed, each once")

    def runs(self) -> list[tuple[TrainConfig, EvalConfig]]:
        """The (train, eval) configs of every run, in schedule-major order."""
        out = []
        for schedule in self.schedules:
            for seed in self.seeds:
                train = dataclasses.replace(self.train, schedule=schedule, seed=seed)
                train.validate()
                # Held-out windows as long as the training rows, unless set: then eval's held-out
                # loss is exactly the trainer's own final held-out measurement.
                evaluation = dataclasses.replace(self.eval, model=f"train/{train.instance()}", name=None,
                                                 seq_len=self.eval.seq_len or train.seq_len)
                out.append((train, evaluation))
        return out


# -- statistics -----------------------------------------------------------------------------------

def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def difference(values: dict[int, float], baseline: dict[int, float]) -> tuple[float | None, float | None]:
    """Mean difference `values - baseline` over seeds and its standard error.

    Paired by seed when both have the same seeds; otherwise the difference of the means, whose
    standard error combines the two (None when either is unknown).
    """
    if not values or not baseline:
        return None, None
    if set(values) == set(baseline):
        return mean_stderr([values[s] - baseline[s] for s in sorted(values)])
    (m, se), (mb, seb) = mean_stderr(list(values.values())), mean_stderr(list(baseline.values()))
    return m - mb, (math.sqrt(se ** 2 + seb ** 2) if se is not None and seb is not None else None)


def run_metrics(results: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """Flatten one eval results.json to {metric: (value, item stderr)}."""
    out: dict[str, tuple[float, float | None]] = {}
    for name, values in sorted(results.get("heldout", {}).items()):
        out[f"heldout_loss/{name}"] = (values["loss"], None)
        if values.get("bpb") is not None:
            out[f"heldout_bpb/{name}"] = (values["bpb"], None)
    for task, values in sorted(results.get("tasks", {}).items()):
        for metric in TASK_METRICS:
            if values.get(metric) is not None:
                out[f"{task}/{metric}"] = (values[metric], values.get(f"{metric}_stderr"))
    return out


def build_table(runs: list[dict[str, Any]], schedules: list[str]) -> list[dict[str, Any]]:
    """One row per (metric, schedule): mean, stderr over seeds, difference to random."""
    per_run = [(r["schedule"], r["seed"], run_metrics(r["results"])) for r in runs]
    metrics = sorted({m for _, _, values in per_run for m in values})
    table = []
    for metric in metrics:
        by_schedule = {s: {seed: v[metric] for sch, seed, v in per_run if sch == s and metric in v} for s in schedules}
        for schedule in schedules:
            seeds = by_schedule[schedule]
            if not seeds:
                continue
            mean, stderr = mean_stderr([value for value, _ in seeds.values()])
            item = [se for _, se in seeds.values() if se is not None]
            diff = diff_se = None
            if schedule != BASELINE and BASELINE in by_schedule:
                diff, diff_se = difference({k: v for k, (v, _) in seeds.items()},
                                           {k: v for k, (v, _) in by_schedule[BASELINE].items()})
            table.append({"metric": metric, "schedule": schedule, "mean": mean, "stderr": stderr,
                          "n_seeds": len(seeds), "item_stderr": sum(item) / len(item) if item else None,
                          "diff_vs_random": diff, "diff_stderr": diff_se})
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    """The table as aligned text: mean ± stderr, and the difference to random ± its stderr."""
    def pm(value: float | None, err: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    rows = [("metric", "schedule", "mean ± se (seeds)", "± se (items)", "seeds", "vs random ± se")]
    for r in table:
        rows.append((r["metric"], r["schedule"], pm(r["mean"], r["stderr"]),
                     f"{r['item_stderr']:.4f}" if r["item_stderr"] is not None else "-", str(r["n_seeds"]),
                     pm(r["diff_vs_random"], r["diff_stderr"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def table_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: "" if row[k] is None else row[k] for k in TABLE_COLUMNS})
    return buf.getvalue()


# -- same budget, same documents ------------------------------------------------------------------

def trained_tokens(run: RunDir, train_key: str, counts: dict[str, Any]) -> int:
    """Tokens a training run consumed: its record's count, else the last step of its log."""
    if "tokens" in counts:
        return int(counts["tokens"])
    log_path = run.path(train_key, "log.jsonl")
    last = None
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "train":
                last = record
    if last is None:
        raise FramelmError(f"{train_key}: neither its manifest record nor {log_path} says how many tokens it trained on")
    return int(last["tokens"])


def documents_fingerprint(run: RunDir, schedule: str) -> str | None:
    """A hash of the multiset of document ids in a schedule (None without RUN/schedule/<s>/order.parquet)."""
    import pyarrow.parquet as pq

    path = run.path("schedule", schedule, "order.parquet")
    if not path.is_file():
        return None
    ids = sorted(pq.read_table(path, columns=["id"])["id"].to_pylist())
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def check_same_budget(runs: list[dict[str, Any]], run: RunDir) -> None:
    """Every run trained on the same number of tokens with the same non-varying settings."""
    tokens = {r["train_key"]: r["tokens"] for r in runs}
    if len(set(tokens.values())) > 1:
        raise FramelmError(f"compared runs trained on different token counts {tokens}; give every schedule the same "
                           f"budget (train.max_tokens no larger than the shortest exported stream)")
    settings = {}
    for r in runs:  # the settings that shape results (not devices or logging), as recorded by each run
        config = TrainConfig.from_dict(run.require(r["train_key"])["config"]).hashed_dict()
        for key in VARIES:
            config.pop(key)
        settings[r["train_key"]] = json.dumps(config, sort_keys=True)
    if len(set(settings.values())) > 1:
        raise FramelmError(f"compared runs differ in training settings other than {VARIES}: {sorted(settings)}")


# -- stage entry -----------------------------------------------------------------------------------

def compare_schedules(cfg: CompareConfig, run: RunDir) -> dict[str, Any]:
    """Train and evaluate every (schedule, seed); write RUN/compare/results.{json,csv}."""
    runs = []
    for train_cfg, eval_cfg in cfg.runs():
        train_key, eval_key = f"train/{train_cfg.instance()}", f"eval/{eval_cfg.instance()}"
        train_counts = run_stage("train", train_cfg, run)
        run_stage("eval", eval_cfg, run)
        results = json.loads(run.path(eval_key, "results.json").read_text())
        runs.append({"schedule": train_cfg.schedule, "seed": train_cfg.seed, "train_key": train_key,
                     "eval_key": eval_key, "tokens": trained_tokens(run, train_key, train_counts),
                     "documents": documents_fingerprint(run, train_cfg.schedule), "results": results})
    check_same_budget(runs, run)

    table = build_table(runs, cfg.schedules)
    fingerprints = {r["documents"] for r in runs}
    out = {"schedules": cfg.schedules, "seeds": cfg.seeds, "baseline": BASELINE,
           "same_documents": None if None in fingerprints else len(fingerprints) == 1,
           "runs": runs, "table": table}
    out_dir = run.path("compare")
    fsutil.write_json(out_dir / "results.json", out)
    fsutil.write_text(out_dir / "results.csv", table_csv(table))
    summary = format_table(table)
    return {"runs": len(runs), "tokens_per_run": runs[0]["tokens"], "same_documents": out["same_documents"],
            "summary": summary}
