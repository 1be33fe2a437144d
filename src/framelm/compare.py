"""`framelm compare`: train and evaluate one model per (schedule, seed), then tabulate.

Every run is the `train` stage and then the `eval` stage, each through
`framelm.pipeline.run_stage`, so a finished run is skipped and an interrupted one resumes
(`--force` on compare retrains and re-evaluates every run, as a dry run lists).
All runs share one TrainConfig template (only `schedule` and `seed` differ), so model, token
budget and learning-rate schedule are the same; the token count each run actually trained on
is read back from its record and must agree across runs. With train.average (ema, sma, wma)
each run is evaluated twice: its final weights (hf/, eval/<schedule>/seed<k>) and its
checkpoint average (hf-avg/, eval/<schedule>/seed<k>-avg).

The table has one row per (metric, weights, schedule):
    metric          heldout_loss/<set>, heldout_bpb/<set>, <task>/{acc,acc_norm,perplexity}
    schedule        the schedule trained on
    weights         "final", or the averaging method ("ema", ...) for the checkpoint average;
                    shown as "<schedule>+<method>", e.g. frame+ema
    mean, stderr    mean over seeds and its standard error (sample standard deviation /
                    sqrt(seeds); null with one seed, as one seed says nothing about seed variance)
    n_seeds         seeds the mean is over
    item_stderr     the evaluation's own standard error over task items (mean over seeds), so a
                    single-seed comparison still shows how much accuracies could move with other items
    diff_vs_random  mean difference to `random` with the same weights (frame+ema - random+ema)
    diff_stderr     its standard error; null where it cannot be estimated
    diff_paired     true: paired by seed (both have the metric for the same seeds); false: the
                    difference of the two means
    diff_df         degrees of freedom of its t test: seeds - 1 when paired, else Welch-Satterthwaite
    diff_p          two-sided p-value of that t test (paired, or Welch's); null without a standard
                    error or with no spread at all across seeds
The baseline's rows have null differences. A row over a non-finite value (NaN or infinite, as
from a diverged run) is not comparable: its mean, stderr, differences and p-value are null, as
are the differences to a baseline row that is not comparable; results.json lists those values
under `non_finite` (eval_key, schedule, weights, seed, metric, value as text) and the summary
names them.

results.json also lists every evaluated run ("runs": schedule, weights, seed, train_key,
eval_key, tokens, documents, n_documents, results) and `same_documents`: whether every run
trained on the same multiset of documents. A run trains on a prefix of its stream when
train.max_tokens is below the stream length (FRAME's prefix is its first stages), so only the
documents with a token inside that prefix count: `n_documents` of them, hashed into `documents`
(null without RUN/schedule/<schedule>/order.parquet, and then `same_documents` is null).
Budgets end on whole training steps, so even two orders of the same documents lose different
stream ends: `shared_documents` gives, per schedule, the documents (with repeats) it and random
both trained on, as a share of the larger of the two runs' documents, and the summary cautions
below SHARED_DOCUMENTS_CAUTION.

Reads: RUN/train/<schedule>/seed<k>/ records, RUN/eval/<schedule>/seed<k>[-avg]/results.json,
RUN/schedule/<schedule>/order.parquet (which documents each schedule holds, in stream order).
`heldout_sets` gives each held-out set's docs and tokens (from eval's results.json); with a
partition, `quadrants_without_heldout` lists the quadrants that have no held-out set (so no row).
The summary cautions on sets below HELDOUT_CAUTION_DOCS documents or HELDOUT_CAUTION_TOKENS tokens.
`unigram_heldout_loss` gives each set's loss under a unigram model of the train-split tokens
(framelm.heldout.unigram_loss), the floor a model must beat to know more than token frequencies;
the summary cautions when the best schedule's held-out loss is less than UNIGRAM_CAUTION_NATS
below it.

Writes: RUN/compare/results.json, RUN/compare/results.csv (the table).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from typing import Any, NamedTuple

import numpy as np

from framelm import fsutil
from framelm.config import ConfigError, StageConfig, field
from framelm.errors import FramelmError
from framelm.evaluate import AVERAGED, EvalConfig
from framelm.ingest import MIN_SPLIT_DOCS
from framelm.pipeline import FORCED, run_stage
from framelm.rundir import RunDir
from framelm.train import TrainConfig
from framelm.train.data import budget_steps, read_stream

BASELINE = "random"
FINAL = "final"  # the `weights` of an evaluation of a run's final weights (hf/)
TABLE_COLUMNS = ("metric", "schedule", "weights", "mean", "stderr", "n_seeds", "item_stderr", "diff_vs_random",
                 "diff_stderr", "diff_paired", "diff_df", "diff_p")
TASK_METRICS = ("acc", "acc_norm", "perplexity")
VARIES = ("schedule", "seed")  # the only TrainConfig fields that may differ between compared runs
SHARED_DOCUMENTS_CAUTION = 0.95  # below this share of common documents, a difference is not one of order alone
# Below either, the held-out loss a verdict reads is too small a sample to rank schedules on (see
# MIN_SPLIT_DOCS); 20,000 tokens is ten times less than eval's default of 200,000 tokens per set.
HELDOUT_CAUTION_DOCS = MIN_SPLIT_DOCS
HELDOUT_CAUTION_TOKENS = 20_000
# Models that beat a unigram model of their training tokens by less than this have learned little
# beyond token frequencies; their held-out loss then swings with the sources they saw last.
UNIGRAM_CAUTION_NATS = 0.5
TABLE_FORMAT = 3  # 1: no weights, diff_paired, diff_df or diff_p columns; same_documents over whole streams;
                  # 2: no unigram_heldout_loss


@dataclasses.dataclass
class CompareConfig(StageConfig):
    schedules: list[str] = field(default_factory=lambda: ["frame", BASELINE],
                                 help="exported schedules to train on; 'random' is the baseline differences are taken to")
    seeds: list[int] = field(default_factory=lambda: [0], help="training seeds; each schedule is trained once per seed")
    train: TrainConfig = field(default_factory=TrainConfig, help="training settings shared by every run "
                               "(its schedule and seed are set per run)")
    eval: EvalConfig = field(default_factory=EvalConfig, help="evaluation settings shared by every run "
                             "(its model and name are set per run; seq_len defaults to train.seq_len)")

    # it re-trains and re-evaluates the runs its input_fingerprint finds replaced (see pipeline)
    remakes_inputs = True

    def hashed_dict(self) -> dict[str, Any]:
        # A run directory compared by an older framelm re-tabulates (its trainings are reused).
        return {**super().hashed_dict(), "table_format": TABLE_FORMAT}

    def input_fingerprint(self, run: RunDir) -> dict[str, Any]:
        """The train/eval records compare reads that are not what compare's own config makes of them.

        A standalone `framelm train` (or eval) can replace a record under a key compare owns
        (train/frame/seed0 with another config); compare's own hash must then change, so that it
        re-runs, re-trains what is stale through run_stage and re-tabulates. A record that matches
        the hash compare would give it is left out, so the fingerprint is {} whenever compare's
        inputs are its own (before and after it runs: no spurious re-run). A missing record counts
        only once compare has finished (a deleted record); before the first run every record is
        missing and compare creates them."""
        from framelm.pipeline import stage_hash, stage_key

        compared = run.record(stage_key("compare", self))
        out: dict[str, Any] = {}
        for name, cfg in self.owned_stages():
            key = stage_key(name, cfg)
            rec = run.record(key)
            if rec is None:
                if compared is not None:
                    out[key] = "missing"
                continue
            expected, _ = stage_hash(name, cfg, run, dry_run=True)
            if rec.get("status") != "done" or rec.get("hash") != expected:
                out[key] = f"{rec.get('status')}:{rec.get('hash')}"
        return out

    def owned_stages(self) -> list[tuple[str, StageConfig]]:
        """(stage name, config) of every train and eval run that compare makes through run_stage."""
        return [(name, cfg) for train_cfg, evaluations in self.runs()
                for name, cfg in (("train", train_cfg), *(("eval", e) for e in evaluations))]

    def validate(self) -> None:
        if not self.schedules or len(set(self.schedules)) != len(self.schedules):
            raise ConfigError(f"'schedules' = {self.schedules} must list at least one schedule, each once")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"'seeds' = {self.seeds} must list at least one seed, each once")

    def runs(self) -> list[tuple[TrainConfig, list[EvalConfig]]]:
        """Every run's train config and its evaluations (final weights, then the checkpoint average
        when train.average is set), in schedule-major order."""
        out = []
        for schedule in self.schedules:
            for seed in self.seeds:
                train = dataclasses.replace(self.train, schedule=schedule, seed=seed)
                train.validate()
                models = [f"train/{train.instance()}"]
                if train.average != "none":
                    models.append(f"train/{train.instance()}/{AVERAGED}")
                # Held-out windows as long as the training rows, unless set. This is the trainer's own
                # final held-out measurement only on the final weights and with eval.heldout_tokens equal
                # to train.heldout_max_tokens_per_set; their defaults differ (200,000 and 50,000 tokens
                # per set), so by default eval scores more held-out documents than the training log.
                out.append((train, [dataclasses.replace(self.eval, model=model, name=None,
                                                        seq_len=self.eval.seq_len or train.seq_len)
                                    for model in models]))
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


class Difference(NamedTuple):
    value: float | None
    stderr: float | None
    df: float | None  # degrees of freedom of the t test
    paired: bool | None


def difference(values: dict[int, float], baseline: dict[int, float]) -> Difference:
    """Mean difference `values - baseline` over seeds, its standard error and degrees of freedom.

    Paired by seed when both have the same seeds (n - 1 degrees of freedom); otherwise the
    difference of the means, whose standard error combines the two, with Welch-Satterthwaite
    degrees of freedom. Standard error and degrees of freedom are None where unknown (one seed
    on a side); Welch's degrees of freedom also where neither side varies (the formula is 0 / 0).
    """
    if not values or not baseline:
        return Difference(None, None, None, None)
    if set(values) == set(baseline):
        diff, se = mean_stderr([values[s] - baseline[s] for s in sorted(values)])
        return Difference(diff, se, len(values) - 1 if se is not None else None, True)
    (m, se), (mb, seb) = mean_stderr(list(values.values())), mean_stderr(list(baseline.values()))
    if se is None or seb is None:
        return Difference(m - mb, None, None, False)
    v, vb = se ** 2, seb ** 2
    df = (v + vb) ** 2 / (v ** 2 / (len(values) - 1) + vb ** 2 / (len(baseline) - 1)) if v + vb > 0 else None
    return Difference(m - mb, math.sqrt(v + vb), df, False)


def t_test_p(diff: Difference) -> float | None:
    """Two-sided p-value of the t test that the difference is zero; None without a standard error
    or degrees of freedom, or with no spread (a zero standard error leaves the statistic undefined)."""
    if diff.value is None or diff.stderr is None or diff.df is None or diff.stderr <= 0:
        return None
    from scipy import stats

    return float(2 * stats.t.sf(abs(diff.value) / diff.stderr, diff.df))


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


def non_finite_values(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluations' non-finite metric values (NaN or infinite: a diverged run), each with its
    run and metric; the value as text ("nan", "inf"), which JSON can hold."""
    return [{"eval_key": r["eval_key"], "schedule": r["schedule"], "weights": r.get("weights", FINAL),
             "seed": r["seed"], "metric": metric, "value": str(value)}
            for r in runs for metric, (value, _) in run_metrics(r["results"]).items() if not math.isfinite(value)]


def non_finite_note(results: dict[str, Any]) -> str | None:
    """What a reader must know when an evaluation gave non-finite values (None when none did)."""
    found = [v for v in results.get("non_finite") or [] if isinstance(v, dict)]
    if not found:
        return None
    per_run: dict[str, list[str]] = {}
    for v in found:
        per_run.setdefault(str(v.get("eval_key")), []).append(f"{v.get('metric')} = {v.get('value')}")
    return ("caution: not comparable: non-finite results (a diverged run?) in "
            + "; ".join(f"{key}: {', '.join(values)}" for key, values in per_run.items())
            + f"; for those metrics the table gives that schedule no mean, standard error, difference to {BASELINE} "
              f"or p-value (and where the run is {BASELINE}'s, no schedule a difference)")


def label(schedule: str, weights: str) -> str:
    """How a (schedule, weights) pair is named in tables: frame, or frame+ema for averaged weights."""
    return schedule if weights == FINAL else f"{schedule}+{weights}"


def build_table(runs: list[dict[str, Any]], schedules: list[str]) -> list[dict[str, Any]]:
    """One row per (metric, weights, schedule): mean, stderr over seeds, difference to random
    with the same weights. A run without "weights" was evaluated on its final weights."""
    per_run = [(r["schedule"], r.get("weights", FINAL), r["seed"], run_metrics(r["results"])) for r in runs]
    metrics = sorted({m for *_, values in per_run for m in values})
    all_weights = list(dict.fromkeys(w for _, w, _, _ in per_run))
    table = []
    for metric in metrics:
        for weights in all_weights:
            by_schedule = {s: {seed: v[metric] for sch, w, seed, v in per_run if (sch, w) == (s, weights) and metric in v}
                           for s in schedules}
            baseline = {k: v for k, (v, _) in by_schedule.get(BASELINE, {}).items()}
            for schedule in schedules:
                seeds = by_schedule[schedule]
                if not seeds:
                    continue
                # A non-finite value (a diverged run) would make every statistic over it NaN: the row
                # is not comparable, its statistics are null and compare's summary names the run.
                comparable = all(math.isfinite(value) for value, _ in seeds.values())
                mean, stderr = mean_stderr([value for value, _ in seeds.values()]) if comparable else (None, None)
                item = [se for _, se in seeds.values() if se is not None and math.isfinite(se)] if comparable else []
                diff = (difference({k: v for k, (v, _) in seeds.items()}, baseline)
                        if schedule != BASELINE and comparable and all(map(math.isfinite, baseline.values()))
                        else Difference(None, None, None, None))
                table.append({"metric": metric, "schedule": schedule, "weights": weights, "mean": mean,
                              "stderr": stderr, "n_seeds": len(seeds),
                              "item_stderr": sum(item) / len(item) if item else None,
                              "diff_vs_random": diff.value, "diff_stderr": diff.stderr, "diff_paired": diff.paired,
                              "diff_df": diff.df, "diff_p": t_test_p(diff)})
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    """The table as aligned text: mean ± stderr, the difference to random ± its stderr, its p-value."""
    def pm(value: float | None, err: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    rows = [("metric", "schedule", "mean ± se (seeds)", "± se (items)", "seeds", "vs random ± se", "p (t test)")]
    for r in table:
        rows.append((r["metric"], label(r["schedule"], r["weights"]), pm(r["mean"], r["stderr"]),
                     f"{r['item_stderr']:.4f}" if r["item_stderr"] is not None else "-", str(r["n_seeds"]),
                     pm(r["diff_vs_random"], r["diff_stderr"]), f"{r['diff_p']:.3g}" if r["diff_p"] is not None else "-"))
    return _aligned(rows)


def _aligned(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as text, each column left-aligned to its widest cell."""
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
    records = fsutil.read_log(log_path) if log_path.is_file() else []
    last = next((r for r in reversed(records) if r[1].get("type") == "train"), None)
    if last is None:
        raise FramelmError(f"{train_key}: neither its manifest record nor {log_path} says how many tokens it trained on")
    line_no, record = last
    tokens = record.get("tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise FramelmError(f"{log_path}: line {line_no}: field 'tokens' must be an integer, got {tokens!r}")
    return tokens


def trained_documents(run: RunDir, schedule: str, tokens: int) -> Any:
    """The ids of the documents a run of `tokens` training tokens trained on, sorted, one per
    (document, epoch) (None without RUN/schedule/<schedule>/order.parquet).

    The stream is the schedule's documents in `position` order, each n_tokens followed by an EOS,
    and the trainer reads exactly stream tokens [0, tokens + 1) (the last row's last target is one
    past its inputs), whatever its shuffle window: so the run saw the documents starting before
    token tokens + 1.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = run.path("schedule", schedule, "order.parquet")
    if not path.is_file():
        return None
    lacking = [c for c in ("position", "id", "n_tokens") if c not in pq.ParquetFile(path).schema_arrow.names]
    if lacking:
        raise FramelmError(f"{path}: missing column(s) {', '.join(lacking)}; compare needs position, id and n_tokens "
                           f"to know which documents each run trained on (re-run framelm schedule)")
    order = pq.read_table(path, columns=["position", "id", "n_tokens"]).sort_by("position")
    lengths = order["n_tokens"].to_numpy().astype(np.int64) + 1
    n_docs = int(np.searchsorted(np.cumsum(lengths) - lengths, tokens + 1))
    ids = order["id"].slice(0, n_docs).combine_chunks()
    return pc.take(ids, pc.sort_indices(ids))


def documents_digest(ids: Any) -> str:
    """A hash of a multiset of document ids (given sorted)."""
    return hashlib.sha256("\n".join(ids.to_pylist()).encode()).hexdigest()[:16]


def shared_fraction(ids: Any, baseline: Any) -> float:
    """The share of two runs' trained documents (counted with their repeats) that both trained on:
    1.0 for the same multiset; the budget's end cuts each stream in a different place, so two
    orders of the same documents share slightly less than 1.0."""
    import pyarrow as pa

    def counts(x: Any, name: str) -> pa.Table:
        return pa.table({"id": x}).group_by("id").aggregate([("id", "count")]).rename_columns(["id", name])

    both = counts(ids, "a").join(counts(baseline, "b"), "id", join_type="inner")
    shared = int(np.minimum(both["a"].to_numpy(), both["b"].to_numpy()).sum()) if both.num_rows else 0
    return shared / max(len(ids), len(baseline), 1)


def documents_note(results: dict[str, Any]) -> str | None:
    """What a reader must know when the compared runs did not train on the same documents (None
    when they did or compare could not tell): how much of them they share."""
    if results.get("same_documents") is not False:
        return None
    runs = [r for r in results.get("runs", []) if isinstance(r, dict)]
    shared = {s: f for s, f in (results.get("shared_documents") or {}).items() if isinstance(f, (int, float))}
    counts = {r.get("schedule"): r["n_documents"] for r in runs if isinstance(r.get("n_documents"), int)}
    tokens = next((r["tokens"] for r in runs if isinstance(r.get("tokens"), int)), None)
    facts = ([f"{', '.join(f'{s}: {n:,}' for s, n in counts.items())} documents"
              + (f" in the first {tokens:,} tokens of each stream" if tokens is not None else "")] if counts else [])
    facts += [f"{s} and {BASELINE} share {f:.1%} of their trained documents" for s, f in shared.items()]
    low = any(f < SHARED_DOCUMENTS_CAUTION for f in shared.values()) or not shared
    return (("caution: the schedules trained on different documents" if low else "the schedules trained on nearly the same documents")
            + (f" ({'; '.join(facts)})" if facts else "")
            + (": the differences mix the effect of the order with that of which documents were seen (as intended where "
               "a schedule selects documents); for orders of the same documents, a budget (train.max_tokens) that covers "
               "each stream up to its last whole step compares order alone"
               if low else ": each stream's end past the last whole training step differs"))


# -- how large the held-out sets are --------------------------------------------------------------

def heldout_sizes(runs: list[dict[str, Any]]) -> dict[str, dict[str, int | None]]:
    """Documents and tokens of each held-out set the runs were scored on (the smallest over runs;
    they share one eval config, so normally the same); None where eval did not record it."""
    out: dict[str, dict[str, int | None]] = {}
    for r in runs:
        for name, values in (r.get("results") or {}).get("heldout", {}).items():
            if not isinstance(values, dict):
                continue
            size = out.setdefault(name, {"docs": None, "tokens": None})
            for k in ("docs", "tokens"):
                v = values.get(k)
                if isinstance(v, int) and (size[k] is None or v < size[k]):
                    size[k] = v
    return dict(sorted(out.items()))


def partition_quadrants(run: RunDir) -> list[str] | None:
    """The quadrants of RUN/partition (None without a readable one)."""
    from framelm.labels import LABELS, label_cells

    if not run.path(LABELS).is_file():
        return None
    try:
        return [name for name, _, _ in label_cells(run)]
    except FramelmError:
        return None


def heldout_set_of(metric: str) -> str | None:
    """The held-out set a table metric is measured on (heldout_loss/source/a -> source/a)."""
    head, _, rest = metric.partition("/")
    return rest if head in ("heldout_loss", "heldout_bpb") and rest else None


def heldout_notes(results: dict[str, Any], metric: str | None = "heldout_loss/all") -> list[str]:
    """What a reader must know about the held-out sets behind `metric` (every set when None; none
    for a task metric): one caution naming those below HELDOUT_CAUTION_DOCS documents or
    HELDOUT_CAUTION_TOKENS tokens, and the quadrants that have no held-out set at all."""
    sizes = results.get("heldout_sets")
    wanted = None if metric is None else heldout_set_of(metric)
    notes = []
    if isinstance(sizes, dict) and (metric is None or wanted is not None):
        small = []
        for name, size in sizes.items():
            if wanted is not None and name != wanted or not isinstance(size, dict):
                continue
            docs, tokens = size.get("docs"), size.get("tokens")
            if (isinstance(docs, int) and docs < HELDOUT_CAUTION_DOCS) or (isinstance(tokens, int) and tokens < HELDOUT_CAUTION_TOKENS):
                small.append(f"'{name}' ({docs if docs is not None else '?'} document{'' if docs == 1 else 's'}, "
                             f"{f'{tokens:,}' if tokens is not None else '?'} tokens)")
        if small:
            notes.append(f"caution: held-out set{'s' if len(small) > 1 else ''} below {HELDOUT_CAUTION_DOCS} documents or "
                         f"{HELDOUT_CAUTION_TOKENS:,} tokens, too small a sample to rank schedules on: {', '.join(small)}")
    missing = results.get("quadrants_without_heldout")
    if isinstance(missing, list) and missing:
        notes.append(f"quadrants without a held-out set (no held-out loss for them in the table): "
                     f"{', '.join(map(str, missing))}")
    return notes


def unigram_baseline(cfg: CompareConfig, run: RunDir) -> dict[str, float] | None:
    """Each held-out set's loss under a unigram model of the training documents (the sets eval
    measured: the same documents, capped at eval.heldout_tokens); None without held-out evaluation."""
    from framelm.heldout import heldout_sets, train_token_counts, unigram_loss

    if not cfg.eval.heldout:
        return None
    sets = heldout_sets(run, cfg.eval.heldout_tokens)
    if not sets:
        return None
    counts = train_token_counts(run)
    return {name: round(unigram_loss(counts, hset), 6) for name, hset in sets.items()}


def unigram_gap(results: dict[str, Any]) -> tuple[float, float] | None:
    """(the unigram floor on 'all', the best schedule's held-out loss there); None without either."""
    floor = (results.get("unigram_heldout_loss") or {}).get("all")
    means = [r["mean"] for r in results.get("table", []) if r.get("metric") == "heldout_loss/all"
             and isinstance(r.get("mean"), (int, float)) and math.isfinite(r["mean"])]
    if not isinstance(floor, (int, float)) or not means:
        return None
    return floor, min(means)


def near_unigram_floor(results: dict[str, Any]) -> bool:
    """Whether the best schedule is less than UNIGRAM_CAUTION_NATS below the unigram floor."""
    gap = unigram_gap(results)
    return gap is not None and gap[0] - gap[1] < UNIGRAM_CAUTION_NATS


def unigram_note(results: dict[str, Any]) -> str | None:
    """How far below a unigram model the best schedule's held-out loss is; a caution when by little."""
    gap = unigram_gap(results)
    if gap is None:
        return None
    floor, best = gap
    where = (f"{floor - best:.3f} nats below it" if best <= floor else
             f"{best - floor:.3f} nats above it, worse than token frequencies alone")
    text = (f"a unigram model of the training documents' tokens has held-out loss {floor:.3f} nats on 'all'; "
            f"the best schedule {best:.3f}, {where}")
    if not near_unigram_floor(results):
        return text
    return (f"caution: {text}: the models have learned little beyond token frequencies (less than "
            f"{UNIGRAM_CAUTION_NATS} nats), so a difference between orders mostly says which sources they saw last; "
            f"train longer or larger models before reading it as an effect of the curriculum")


def format_heldout(sizes: dict[str, dict[str, int | None]]) -> str:
    """One line per held-out set: its documents and tokens."""
    if not sizes:
        return ""
    rows = [("held-out set", "docs", "tokens")] + [(n, str(s["docs"]) if s["docs"] is not None else "-",
                                                    str(s["tokens"]) if s["tokens"] is not None else "-")
                                                   for n, s in sizes.items()]
    return _aligned(rows)


def check_budgets(cfg: CompareConfig, run: RunDir) -> None:
    """Before anything trains: every schedule's exported stream gives the same whole steps of the
    budget. Streams of different documents (a selection, a two-phase blend) differ in length by
    their documents' rounding, and a step boundary between them would otherwise be found by
    check_same_budget only after every model had trained."""
    per_step = cfg.train.global_batch_seqs * cfg.train.seq_len
    folders = {s: run.path("export", s, "stream") for s in cfg.schedules}
    unfinished = {t.schedule for t, _ in cfg.runs() if (run.record(f"train/{t.instance()}") or {}).get("status") != "done"}
    for s, folder in folders.items():
        # A stream deleted after all its runs trained (to save disk) needs no check: nothing will read it.
        if not folder.is_dir() and s in unfinished:
            exported = sorted(p.parent.name for p in run.root.glob("export/*/stream") if p.is_dir())
            raise FramelmError(f"compare.schedules names '{s}', which has no exported stream at {folder} (exported: "
                               f"{', '.join(exported) or 'none'}); export it first: framelm export --run-dir {run.root}, "
                               f"with '{s}' among the schedule stage's strategies")
    lengths = {s: len(read_stream(d)[0]) for s, d in folders.items() if d.is_dir()}
    if not lengths:
        return
    planned = {s: budget_steps(n, cfg.train.max_tokens, per_step) * per_step for s, n in lengths.items()}
    too_long = [s for s, n in lengths.items() if cfg.train.max_tokens > n]
    if too_long:
        problem = f"train.max_tokens = {cfg.train.max_tokens:,} exceeds the exported stream of {too_long[0]!r}"
    elif len(set(planned.values())) > 1:
        problem = "the schedules would train on different token counts (" + ", ".join(f"{s} {t:,}" for s, t in planned.items()) + ")"
    else:
        return
    common = min(lengths.values()) // per_step * per_step
    remedy = (f"set compare.train.max_tokens = {common} (the shortest stream's whole steps) so that every schedule "
              f"trains on the same tokens" if common else "the shortest stream holds less than one step")
    streams = ", ".join(f"{s} {n:,}" for s, n in lengths.items())
    raise FramelmError(f"{problem}: their streams hold {streams} tokens and a step takes {per_step:,}; {remedy}")


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
    check_budgets(cfg, run)
    runs = []
    trained: dict[tuple[str, int], Any] = {}  # (schedule, tokens) -> ids of the documents trained on
    digests: dict[tuple[str, int], str | None] = {}  # ... and their documents_digest
    planned = cfg.runs()
    force = FORCED.get()  # `framelm compare --force` retrains and re-evaluates every run
    for train_cfg, evaluations in planned:
        train_key = f"train/{train_cfg.instance()}"
        tokens = trained_tokens(run, train_key, run_stage("train", train_cfg, run, force=force))
        if (train_cfg.schedule, tokens) not in trained:
            ids = trained_documents(run, train_cfg.schedule, tokens)
            trained[train_cfg.schedule, tokens] = ids
            digests[train_cfg.schedule, tokens] = None if ids is None else documents_digest(ids)
        ids = trained[train_cfg.schedule, tokens]
        for eval_cfg in evaluations:
            eval_key = f"eval/{eval_cfg.instance()}"
            run_stage("eval", eval_cfg, run, force=force)
            results = fsutil.read_json(run.path(eval_key, "results.json"), f"re-run: framelm compare --run-dir {run.root} --force")
            runs.append({"schedule": train_cfg.schedule, "weights": train_cfg.average if eval_cfg.averaged else FINAL,
                         "seed": train_cfg.seed, "train_key": train_key, "eval_key": eval_key, "tokens": tokens,
                         "documents": digests[train_cfg.schedule, tokens],
                         "n_documents": None if ids is None else len(ids), "results": results})
    check_same_budget(runs, run)

    table = build_table(runs, cfg.schedules)
    fingerprints = {r["documents"] for r in runs}
    baseline_ids = trained.get((BASELINE, runs[0]["tokens"]))
    out = {"schedules": cfg.schedules, "seeds": cfg.seeds, "baseline": BASELINE,
           "same_documents": None if None in fingerprints else len(fingerprints) == 1,
           "shared_documents": {s: None if ids is None or baseline_ids is None else round(shared_fraction(ids, baseline_ids), 6)
                                for (s, _), ids in trained.items() if s != BASELINE},
           "heldout_sets": heldout_sizes(runs), "unigram_heldout_loss": unigram_baseline(cfg, run),
           "non_finite": non_finite_values(runs), "runs": runs, "table": table}
    quadrants = partition_quadrants(run)
    out["quadrants_without_heldout"] = (None if quadrants is None or not out["heldout_sets"] else
                                        [q for q in quadrants if f"quadrant/{q}" not in out["heldout_sets"]])
    out_dir = run.path("compare")
    fsutil.write_json(out_dir / "results.json", out)
    fsutil.write_text(out_dir / "results.csv", table_csv(table))
    summary = format_table(table)
    if out["heldout_sets"]:
        summary += "\n" + format_heldout(out["heldout_sets"])
    for line in [non_finite_note(out), documents_note(out), *heldout_notes(out, None), unigram_note(out)]:
        if line:
            summary += "\n" + line
    return {"runs": len(planned), "evaluations": len(runs), "tokens_per_run": runs[0]["tokens"],
            "same_documents": out["same_documents"], "summary": summary}
