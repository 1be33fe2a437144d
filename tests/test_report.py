"""framelm.report: the HTML page and its figures, built from a fabricated run directory."""

from __future__ import annotations

import html.parser
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from framelm.cli import main
from framelm.compare import build_table
from framelm.errors import ConfigError, FramelmError
from framelm.partition import read_labelled, write_labels
from framelm.pipeline import run_stage
from framelm.report import ReportConfig, build_report
from framelm.report.comparison import verdict_lines
from framelm.report.quadrants import lines_from_data, stated_lines
from framelm.rundir import RunDir

SOURCES = ("books", "math", "web")
SCHEDULES = ("frame", "random")
FRAME_ORDER = ("Q3", "Q4", "Q1", "Q2")
TASKS = ("copa", "piqa")


# -- a fabricated run directory that follows docs/ARCHITECTURE.md -------------------------------

def write_partition(root: Path, rng: np.random.Generator, n_docs: int = 400, with_cuts: bool = True) -> dict:
    source = rng.choice(SOURCES, n_docs)
    ppl = np.exp(rng.normal(3.0, 0.6, n_docs) + (source == "books") * 0.5)
    pd_ = rng.normal(0.3, 0.1, n_docs) - (source == "books") * 0.05
    split = np.where(rng.random(n_docs) < 0.9, "train", "heldout")
    # FRAME's default: nested medians fit on the training documents.
    train = split == "train"
    ppl_cut = float(np.median(ppl[train]))
    ppl_bin = (ppl > ppl_cut).astype(np.int8)
    pd_cuts = [float(np.median(pd_[train & (ppl_bin == b)])) for b in (0, 1)]
    pd_bin = (pd_ > np.where(ppl_bin == 1, pd_cuts[1], pd_cuts[0])).astype(np.int8)
    quadrant = np.array([f"Q{1 + 2 * a + b}" for a, b in zip(ppl_bin, pd_bin)])
    n_tokens = rng.integers(20, 400, n_docs)
    table = pa.table({
        "id": [f"doc{i}" for i in range(n_docs)], "source": source, "split": split, "n_tokens": n_tokens,
        "ppl": ppl, "pd": pd_, "ppl_bin": ppl_bin, "pd_bin": pd_bin, "quadrant": quadrant,
    })
    for stage in ("score", "partition"):
        (root / stage).mkdir(parents=True)
    scores = root / "score" / "scores.parquet"
    pq.write_table(table.drop_columns(["ppl_bin", "pd_bin", "quadrant"]), scores)
    write_labels(root / "partition" / "quadrants.parquet", scores, [("Q1", 0, 0), ("Q2", 0, 1), ("Q3", 1, 0), ("Q4", 1, 1)],
                 [2 * ppl_bin.astype(np.int16) + pd_bin])
    summary = {"excluded": {"no_score": 3}, "cut_points": []}
    if with_cuts:  # the shape framelm.partition writes for a nested split
        summary["cut_points"] = [{"axis": "ppl", "source": None, "ppl_bin": None, "cuts": [ppl_cut]}] + [
            {"axis": "pd", "source": None, "ppl_bin": b, "cuts": [c]} for b, c in enumerate(pd_cuts)]
    (root / "partition" / "summary.json").write_text(json.dumps(summary))
    return {"table": table, "ppl_cut": ppl_cut, "pd_cuts": pd_cuts}


def write_schedules(root: Path, table: pa.Table, rng: np.random.Generator) -> None:
    """frame: quadrants in FRAME's order; random: shuffled, cut into the same stage budgets.
    Stage tokens are stream tokens, each document's n_tokens and its EOS."""
    t = table.filter(pa.compute.equal(table["split"], "train")).to_pydict()
    rows = list(zip(t["id"], t["source"], t["quadrant"], t["n_tokens"]))
    frame = sorted(rows, key=lambda r: FRAME_ORDER.index(r[2]))
    budgets = [sum(r[3] + 1 for r in rows if r[2] == q) for q in FRAME_ORDER]
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    for name, docs in (("frame", frame), ("random", shuffled)):
        stream_tokens = np.array([r[3] + 1 for r in docs])
        cum = np.cumsum(stream_tokens) - stream_tokens
        stage = np.searchsorted(np.cumsum(budgets), cum, side="right").astype(np.int32)
        d = root / "schedule" / name
        d.mkdir(parents=True)
        pq.write_table(pa.table({
            "position": np.arange(len(docs), dtype=np.int64), "id": [r[0] for r in docs],
            "stage": stage, "source": [r[1] for r in docs], "quadrant": [r[2] for r in docs],
            "n_tokens": np.array([r[3] for r in docs], dtype=np.int64), "epoch": np.zeros(len(docs), dtype=np.int32),
        }), d / "order.parquet")
        ends = np.cumsum(budgets).tolist()
        stages = [{"name": f"{name}-{i}", "start_token": s, "end_token": e}
                  for i, (s, e) in enumerate(zip([0, *ends[:-1]], ends))]
        (d / "stages.yaml").write_text(yaml.safe_dump({"stages": stages}))
        meta = root / "export" / name / "stream"
        meta.mkdir(parents=True)
        (meta / "meta.json").write_text(json.dumps({"dtype": "uint16", "n_tokens": ends[-1], "eos_id": 0,
                                                    "vocab_size": 512, "stages": stages}))


def write_logs(root: Path, seeds: tuple[int, ...], rng: np.random.Generator, steps: int = 40) -> None:
    for name in SCHEDULES:
        for seed in seeds:
            d = root / "train" / name / f"seed{seed}"
            d.mkdir(parents=True)
            lines = []
            for step in range(1, steps + 1):
                tokens = step * 1024
                loss = 6.0 * math.exp(-step / 15) + 2.0 + rng.normal(0, 0.05)
                lines.append({"type": "train", "step": step, "tokens": tokens, "loss": loss, "lr": 1e-3, "stage": 0})
                if step % 10 == 0:
                    lines.append({"type": "heldout", "step": step, "tokens": tokens, "losses": {
                        "all": loss + 0.1, "source/web": loss + 0.2, "quadrant/Q1": loss + 0.05}})
            (d / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def t_test(diff: float, stderr: float | None, n_seeds: int) -> dict:
    """The diff_* columns framelm.compare writes for a difference paired over n_seeds seeds."""
    from scipy import stats

    if stderr is None or n_seeds < 2:
        return {"diff_stderr": None, "diff_paired": True, "diff_df": None, "diff_p": None}
    return {"diff_stderr": stderr, "diff_paired": True, "diff_df": n_seeds - 1,
            "diff_p": float(2 * stats.t.sf(abs(diff) / stderr, n_seeds - 1))}


def write_compare(root: Path, seeds: tuple[int, ...], rng: np.random.Generator, frame_diff: float = -0.05,
                  diff_stderr: float | None = 0.01, **extra) -> None:
    """A compare/results.json; `extra` goes to its top level (same_documents, ...)."""
    runs = []
    for name in SCHEDULES:
        for seed in seeds:
            tasks = {t: {"acc": float(rng.uniform(0.4, 0.7)), "acc_stderr": 0.03, "acc_norm": 0.5,
                         "acc_norm_stderr": 0.03, "n": 100} for t in TASKS}
            runs.append({"schedule": name, "seed": seed, "train_key": f"train/{name}/seed{seed}",
                         "eval_key": f"eval/{name}-seed{seed}", "tokens": 40960,
                         "results": {"heldout": {"all": {"loss": 3.0, "bpb": 1.2, "tokens": 5000}}, "tasks": tasks}})
    n = len(seeds)
    table = [
        {"metric": "heldout_loss/all", "schedule": "random", "mean": 3.10, "stderr": 0.01, "n_seeds": n,
         "diff_vs_random": None, **t_test(0, None, n)},
        {"metric": "heldout_loss/all", "schedule": "frame", "mean": 3.10 + frame_diff, "stderr": 0.01,
         "n_seeds": n, "diff_vs_random": frame_diff, **t_test(frame_diff, diff_stderr, n)},
        {"metric": "heldout_loss/source/all-caps", "schedule": "frame", "mean": 3.0, "stderr": 0.01,
         "n_seeds": n, "diff_vs_random": 0.5, **t_test(0.5, 0.01, n)},  # not the overall held-out loss
        {"metric": "piqa/acc", "schedule": "frame", "mean": 0.55, "stderr": 0.02, "n_seeds": n,
         "item_stderr": 0.04, "diff_vs_random": 0.01, **t_test(0.01, 0.02, n)},
    ]
    (root / "compare").mkdir(parents=True)
    (root / "compare" / "results.json").write_text(json.dumps({"schedules": list(SCHEDULES), "seeds": list(seeds),
                                                               "runs": runs, "table": table, **extra}))


def make_run(root: Path, seeds: tuple[int, ...] = (0, 1), parts: tuple[str, ...] = ("partition", "schedule", "train", "compare")) -> RunDir:
    rng = np.random.default_rng(0)
    part = write_partition(root, rng)
    if "schedule" in parts:
        write_schedules(root, part["table"], rng)
    if "train" in parts:
        write_logs(root, seeds, rng)
    if "compare" in parts:
        write_compare(root, seeds, rng)
    if "partition" not in parts:
        shutil.rmtree(root / "partition")
    return RunDir(root)


class _Images(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def page_images(report: Path) -> _Images:
    parser = _Images()
    parser.feed((report / "index.html").read_text())
    return parser


def has_data(fig) -> bool:
    """Whether a figure draws any data: lines, collections (bands, scatter, areas), bars or images
    on some axes (an axes' own background patch and spines do not count)."""
    return any(ax.lines or ax.collections or ax.patches or ax.images for ax in fig.axes)


@pytest.fixture(scope="module")
def saved_figures():
    """Every Figure framelm.plots saves while the fixture is active, by file name."""
    from framelm import plots

    figures: dict[str, object] = {}
    original = plots._save

    def save(fig, path, dpi):
        original(fig, path, dpi)
        figures[Path(path).name] = fig

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", save)
        yield figures


def assert_valid_png(path: Path, figures: dict | None = None) -> None:
    """A readable, non-trivial PNG; with `figures` (saved_figures), also one whose figure drew data:
    an empty axes with its title and labels already has many colours, so pixels alone cannot tell."""
    if figures is not None:
        assert path.name in figures and has_data(figures[path.name]), f"{path}: the figure holds no data"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 100 and im.height > 100
        # not a blank canvas: a real plot has many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20, path


# -- tests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_report(tmp_path_factory, saved_figures) -> tuple[RunDir, dict]:
    """One report over a run with every stage's outputs, shared by the tests that only read it."""
    run = make_run(tmp_path_factory.mktemp("full") / "run")
    counts = run_stage("report", ReportConfig(), run)
    return run, {**counts, "_figures": dict(saved_figures)}


def test_full_report_has_every_figure_and_references_exactly_them(full_report):
    run, counts = full_report
    report = run.path("report")
    pngs = {p.name for p in report.glob("*.png")}
    assert pngs == {"scores.png", "quadrants.png", "schedule-frame.png", "schedule-random.png", "loss.png",
                    "heldout-sets.png", "accuracy.png"}
    for name in pngs:
        assert_valid_png(report / name, counts["_figures"])
    parsed = page_images(report)
    assert sorted(parsed.srcs) == sorted(pngs)
    assert all("://" not in u and not u.startswith("//") for u in parsed.urls), parsed.urls
    text = (report / "index.html").read_text()
    assert "<script" not in text and "<link" not in text
    assert "not run yet" not in text
    assert text.count("<figcaption>") == len(pngs)
    # the verdict comes from the table: -0.05 +- 0.01 is 5 standard errors, but over 2 seeds the
    # t test has 1 degree of freedom: p = 0.13
    assert ("frame vs random: held-out loss -0.050 ± 0.010 nats (better, not significant: p = 0.13, "
            "paired t test over 2 seeds)") in text
    assert "summary.json's cut points" in text and "standard error across seeds" in text
    assert counts["figures"] == len(pngs) and counts["not_run_yet"] == 0
    assert "Runs shown: train/frame/seed0, train/frame/seed1, train/random/seed0, train/random/seed1" in text
    assert "frame vs random" in counts["summary"]


def test_quadrant_table_matches_the_data(full_report):
    run, _ = full_report
    text = run.path("report", "index.html").read_text()
    t = read_labelled(run).to_pandas()
    train = t[t.split == "train"]
    assert len(train) < len(t)
    for q, g in train.groupby("quadrant"):
        share = g.n_tokens.sum() / train.n_tokens.sum()
        assert f"<td>{q}</td><td>{len(g):,}</td><td>{g.n_tokens.sum():,}</td><td>{share:.1%}</td>" in text
    assert "no_score: 3" in text


@pytest.mark.parametrize("diff,stderr,seeds,expected", [
    (0.012, 0.020, 5, "frame vs random: held-out loss +0.012 ± 0.020 nats (worse, not significant: p = 0.58, "
                      "paired t test over 5 seeds)"),
    (0.050, 0.010, 5, "frame vs random: held-out loss +0.050 ± 0.010 nats (worse, significant: p = 0.007, "
                      "paired t test over 5 seeds)"),
    (-0.020, None, 1, "frame vs random: held-out loss -0.020 nats (no standard error with 1 seed(s): no significance claim)"),
])
def test_verdict_is_computed_from_the_table(tmp_path, diff, stderr, seeds, expected):
    root = tmp_path / "run"
    root.mkdir()
    write_compare(root, tuple(range(seeds)), np.random.default_rng(1), frame_diff=diff, diff_stderr=stderr)
    counts = build_report(ReportConfig(), RunDir(root))
    assert expected in (root / "report" / "index.html").read_text()
    assert expected in counts["summary"]


def seed_runs(losses: dict[str, list[float]]) -> list[dict]:
    return [{"schedule": s, "seed": seed, "results": {"heldout": {"all": {"loss": loss}}}}
            for s, values in losses.items() for seed, loss in enumerate(values)]


def test_three_standard_errors_over_two_seeds_is_not_significant():
    # paired differences 0.04 and 0.02: mean 0.03, standard error 0.01, so 3 standard errors; a
    # t distribution with 1 degree of freedom puts 20% of its mass beyond that
    table = build_table(seed_runs({"frame": [3.04, 3.02], "random": [3.0, 3.0]}), ["frame", "random"])
    [verdict] = verdict_lines(ReportConfig(), table, "heldout_loss/all")
    assert verdict == ("frame vs random: held-out loss +0.030 ± 0.010 nats (worse, not significant: p = 0.20, "
                       "paired t test over 2 seeds)")
    [verdict] = verdict_lines(ReportConfig(significance_level=0.25), table, "heldout_loss/all")
    assert "(worse, significant: p = 0.20" in verdict
    # unpaired (no seed in common): Welch's test, which names both seed counts
    runs = seed_runs({"frame": [3.04, 3.02, 3.03]}) + [
        {**r, "seed": r["seed"] + 10} for r in seed_runs({"random": [3.0, 3.01]})]
    [verdict] = verdict_lines(ReportConfig(), build_table(runs, ["frame", "random"]), "heldout_loss/all")
    assert "Welch t test over 3 and 2 seeds" in verdict


@pytest.mark.parametrize("n_seeds", [2, 3, 5])
def test_no_difference_is_called_significant_at_the_nominal_rate(n_seeds):
    """Under the null (both schedules the same up to seed noise) the verdict says "significant"
    in about 5% of comparisons, whatever the number of seeds (2 standard errors: 10-30%)."""
    rng = np.random.default_rng(n_seeds)
    trials = 2000
    hits = 0
    for _ in range(trials):
        noise = 3.0 + rng.normal(0, 0.02, (2, n_seeds))
        table = build_table(seed_runs({"frame": noise[0].tolist(), "random": noise[1].tolist()}), ["frame", "random"])
        hits += ", significant: p" in verdict_lines(ReportConfig(), table, "heldout_loss/all")[0]
    assert 0.035 < hits / trials < 0.065  # 5% +- 3 binomial standard errors


def test_table_without_p_values_makes_no_significance_claim(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    write_compare(root, (0, 1), np.random.default_rng(1), frame_diff=-0.5, diff_stderr=0.01)  # 50 standard errors
    path = root / "compare" / "results.json"
    data = json.loads(path.read_text())
    for row in data["table"]:  # as an older framelm wrote it
        for key in ("diff_paired", "diff_df", "diff_p"):
            del row[key]
    path.write_text(json.dumps(data))
    counts = build_report(ReportConfig(), RunDir(root))
    text = (root / "report" / "index.html").read_text()
    assert ("frame vs random: held-out loss -0.500 ± 0.010 nats (better; no p-value: this results.json predates "
            "compare's t test, re-run framelm compare to re-tabulate: no significance claim)") in counts["summary"]
    assert "significant:" not in text and "<td>yes</td>" not in text and "<td>no</td>" not in text


def test_comparison_table_shows_p_and_significance(full_report):
    run, _ = full_report
    text = run.path("report", "index.html").read_text()
    assert "<th>p (t test)</th><th>significant (p &lt; 0.05)</th>" in text
    assert "<td>-0.05 ± 0.01</td><td>0.13</td><td>no</td>" in text
    assert "<td>0.5 ± 0.01</td><td>0.013</td><td>yes</td>" in text  # 50 standard errors over 2 seeds


@pytest.mark.parametrize("shared, expected", [
    (0.8, "caution: the schedules trained on different documents (frame: 1,200, random: 1,350 documents in the "
          "first 40,960 tokens of each stream; frame and random share 80.0% of their trained documents): the "
          "differences mix"),
    (0.99, "the schedules trained on nearly the same documents (frame: 1,200, random: 1,350 documents in the first "
           "40,960 tokens of each stream; frame and random share 99.0% of their trained documents): each stream's end"),
])
def test_different_documents_are_stated_plainly(tmp_path, shared, expected):
    root = tmp_path / "run"
    root.mkdir()
    write_compare(root, (0,), np.random.default_rng(1), same_documents=False, shared_documents={"frame": shared})
    data = json.loads((root / "compare" / "results.json").read_text())
    for r in data["runs"]:
        r["n_documents"] = {"frame": 1200, "random": 1350}[r["schedule"]]
    (root / "compare" / "results.json").write_text(json.dumps(data))
    counts = build_report(ReportConfig(), RunDir(root))
    assert expected in counts["summary"]
    assert html.escape(expected[0].upper() + expected[1:]) in (root / "report" / "index.html").read_text()
    write_compare(tmp_path / "same", (0,), np.random.default_rng(1), same_documents=True)
    build_report(ReportConfig(), RunDir(tmp_path / "same"))
    assert "the schedules trained on" not in (tmp_path / "same" / "report" / "index.html").read_text()


def test_a_diverged_run_is_named_in_the_report(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    non_finite = [{"eval_key": "eval/frame-seed0", "schedule": "frame", "weights": "final", "seed": 0,
                   "metric": "heldout_loss/all", "value": "nan"}]
    write_compare(root, (0,), np.random.default_rng(1), non_finite=non_finite)
    counts = build_report(ReportConfig(), RunDir(root))
    assert "caution: not comparable: non-finite results (a diverged run?) in eval/frame-seed0: heldout_loss/all = nan" \
        in counts["summary"]
    assert "Caution: not comparable: non-finite results" in (root / "report" / "index.html").read_text()


def test_averaged_weights_get_their_own_verdict_and_bars(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    write_compare(root, (0, 1), np.random.default_rng(1))
    data = json.loads((root / "compare" / "results.json").read_text())
    data["runs"] += [{**r, "weights": "ema"} for r in data["runs"]]
    data["table"] += [{**r, "weights": "ema", "diff_vs_random": r["diff_vs_random"] and -r["diff_vs_random"]}
                      for r in data["table"]]
    (root / "compare" / "results.json").write_text(json.dumps(data))
    counts = build_report(ReportConfig(), RunDir(root))
    assert "frame vs random: held-out loss -0.050" in counts["summary"]
    assert "frame+ema vs random+ema: held-out loss +0.050" in counts["summary"]
    text = (root / "report" / "index.html").read_text()
    assert "<td>frame+ema</td>" in text and "<td>random+ema</td>" in text


def test_verdict_metric_must_exist(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    write_compare(root, (0, 1, 2), np.random.default_rng(1))
    with pytest.raises(ConfigError, match="verdict_metric.*heldout_loss/all"):
        build_report(ReportConfig(verdict_metric="mmlu/acc"), RunDir(root))
    build_report(ReportConfig(verdict_metric="piqa/acc"), RunDir(root))
    assert "frame vs random: piqa/acc +0.010 ± 0.020 (better, not significant" in (root / "report" / "index.html").read_text()


@pytest.mark.parametrize("parts,figures", [
    ((), set()),
    (("train",), {"loss.png", "heldout-sets.png"}),
    (("compare",), {"accuracy.png"}),
])
def test_missing_inputs_are_listed_as_not_run_yet(tmp_path, parts, figures):
    run = make_run(tmp_path / "run", seeds=(0,), parts=parts)
    counts = build_report(ReportConfig(), run)
    report = run.path("report")
    assert {p.name for p in report.glob("*.png")} == figures
    assert sorted(page_images(report).srcs) == sorted(figures)
    text = (report / "index.html").read_text()
    assert text.count('<p class="missing">not run yet') == counts["not_run_yet"] == 5 - counts["sections"]
    assert ("not run yet: no compare/results.json" in text) == ("compare" not in parts)
    assert ("not run yet: no train/*/seed*/log.jsonl" in text) == ("train" not in parts)
    assert ("framelm partition --run-dir" in text) == ("partition" not in parts)


def test_one_seed_has_no_band_and_says_so(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("train", "compare"))
    build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "standard error across seeds" not in text
    assert "one seed: sampling of the task" in text


def test_loss_caption_says_why_no_stage_boundary_is_drawn(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("schedule", "train"))
    build_report(ReportConfig(), run)
    assert "Dotted vertical lines" in run.path("report", "index.html").read_text()
    for name in SCHEDULES:  # single-stage exports: the file is there, with nothing to mark
        meta = run.path("export", name, "stream", "meta.json")
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "stages": [{"name": "all", "start_token": 0}]}))
    build_report(ReportConfig(), run)
    assert "each exported schedule shown has a single stage" in run.path("report", "index.html").read_text()
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "stages": ["all"]}))
    with pytest.raises(FramelmError, match=r"meta.json: field 'stages' must be a list of"):
        build_report(ReportConfig(), run)
    shutil.rmtree(run.path("export"))
    build_report(ReportConfig(), run)
    assert "no export/&lt;schedule&gt;/stream/meta.json found" in run.path("report", "index.html").read_text()


def test_tasks_on_few_questions_get_a_caution_with_their_counts(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0, 1))  # every task scored on 100 questions
    build_report(ReportConfig(), run)
    text = " ".join(run.path("report", "index.html").read_text().split())
    assert "Questions per task: " + ", ".join(f"{t} 100" for t in sorted(TASKS)) + "." in text
    assert f"Caution: {sorted(TASKS)[0]} (100 questions)" in text and "about ±5 points" in text
    data = json.loads(run.path("compare", "results.json").read_text())
    for r in data["runs"]:
        for m in r["results"]["tasks"].values():
            m["n"] = 2000
    run.path("compare", "results.json").write_text(json.dumps(data))
    build_report(ReportConfig(), run)
    text = " ".join(run.path("report", "index.html").read_text().split())
    assert "questions)" not in text and f"{sorted(TASKS)[0]} 2,000" in text


def test_cut_lines_from_bins_and_stratified_overlap():
    # two PPL bins split at 10..20, PD cut 0.2..0.3 inside bin 0 and 0.5..0.6 inside bin 1
    ranges = [(0, 0, 1.0, 10.0, 0.0, 0.2), (0, 1, 2.0, 9.0, 0.3, 0.9),
              (1, 0, 20.0, 90.0, 0.1, 0.5), (1, 1, 25.0, 99.0, 0.6, 0.8)]
    ppl_cuts, segments = lines_from_data(ranges, 1.0, 100.0)
    assert ppl_cuts == [pytest.approx(math.sqrt(200.0))]
    assert segments == [(1.0, pytest.approx(math.sqrt(200.0)), pytest.approx(0.25)),
                        (pytest.approx(math.sqrt(200.0)), 100.0, pytest.approx(0.55))]
    overlapping = ranges + [(0, 0, 1.0, 30.0, 0.0, 0.2)]  # another source's bin 0 reaches past bin 1's start
    assert lines_from_data(overlapping, 1.0, 100.0) is None


def test_stated_cut_points_nested_and_stratified(tmp_path):
    nested = {"cut_points": [{"axis": "ppl", "source": None, "ppl_bin": None, "cuts": [10.0]},
                             {"axis": "pd", "source": None, "ppl_bin": 0, "cuts": [0.2]},
                             {"axis": "pd", "source": None, "ppl_bin": 1, "cuts": [0.5]}]}
    where = tmp_path / "summary.json"
    assert stated_lines(nested, where, None, 1.0, 100.0) == ([10.0], [(1.0, 10.0, 0.2), (10.0, 100.0, 0.5)])
    assert stated_lines(nested, where, "web", 1.0, 100.0) == stated_lines(nested, where, None, 1.0, 100.0)
    stratified = {"cut_points": [{"axis": "ppl", "source": "web", "ppl_bin": None, "cuts": [5.0]},
                                 {"axis": "pd", "source": "web", "ppl_bin": None, "cuts": [0.3]}]}
    assert stated_lines(stratified, where, None, 1.0, 100.0) is None
    assert stated_lines(stratified, where, "web", 1.0, 100.0) == ([5.0], [(1.0, 100.0, 0.3)])
    assert stated_lines(stratified, where, "books", 1.0, 100.0) is None
    with pytest.raises(FramelmError, match=r"summary\.json: cut_points\[0\]"):
        stated_lines({"cut_points": [{"axis": "ppl", "cuts": "10"}]}, where, None, 1.0, 100.0)


def test_report_without_summary_cuts_draws_cuts_from_the_bins(tmp_path, monkeypatch):
    root = tmp_path / "run"
    root.mkdir()
    write_partition(root, np.random.default_rng(0), with_cuts=False)
    monkeypatch.setattr("framelm.report.quadrants.SAMPLE_DOCS", 100)  # 400 documents: ranges and medians from every 4th
    build_report(ReportConfig(), RunDir(root))
    text = (root / "report" / "index.html").read_text()
    assert "the boundaries between the quadrant bins" in text and "No lines on" not in text
    assert "medians over one document in every 4." in text
    t = read_labelled(RunDir(root)).to_pandas().iloc[::4]
    q1 = t[(t.split == "train") & (t.quadrant == "Q1")]
    assert f"<td>{np.median(q1.ppl):.4g}</td><td>{np.median(q1.pd):.3g}</td>" in text


def test_bad_log_line_names_file_and_line_and_unfinished_last_line_is_skipped(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("train",))
    log = run.path("train", "frame", "seed0", "log.jsonl")
    good = log.read_text()
    log.write_text(good + '{"type": "train", "step": 41, "tok')  # a run still writing
    build_report(ReportConfig(), run)
    assert run.path("report", "loss.png").is_file()
    lines = good.splitlines()
    lines.insert(1, "{not json")
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(FramelmError, match=r"seed0/log\.jsonl: line 2: invalid JSON"):
        build_report(ReportConfig(), run)
    log.write_text(json.dumps({"type": "train", "step": 1, "tokens": "many", "loss": 1.0}) + "\n")
    with pytest.raises(FramelmError, match=r"line 1: field 'tokens' must be a number"):
        build_report(ReportConfig(), run)


def test_bad_parquet_columns_are_named(tmp_path):
    root = tmp_path / "run"
    for stage in ("score", "partition"):
        (root / stage).mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "ppl": [1.0]}), root / "score" / "scores.parquet")
    write_labels(root / "partition" / "quadrants.parquet", root / "score" / "scores.parquet", [("Q1", 0, 0)], [[0]])
    with pytest.raises(FramelmError, match=r"scores\.parquet: missing column\(s\) source, n_tokens, pd"):
        build_report(ReportConfig(), RunDir(root))


def test_rerun_skips_until_an_input_changes(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("compare",))
    run_stage("report", ReportConfig(), run)
    first = run.record("report")["started"]
    run_stage("report", ReportConfig(), run)
    assert run.record("report")["started"] == first  # up to date: skipped
    assert "Loss curves" in run.path("report", "index.html").read_text().split("Sections not run yet")[1]
    write_logs(run.root, (0,), np.random.default_rng(0), steps=5)  # training has started since
    run_stage("report", ReportConfig(), run)
    assert run.record("report")["started"] != first
    assert run.path("report", "loss.png").is_file()


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="density_bins"):
        ReportConfig.from_dict({"density_bins": 1})
    with pytest.raises(ConfigError, match="schedule_groups"):
        ReportConfig.from_dict({"schedule_groups": "stage"})
    for level in (0, 1, 2.0):
        with pytest.raises(ConfigError, match="'significance_level' must lie strictly between 0 and 1"):
            ReportConfig.from_dict({"significance_level": level})


def test_cli_builds_the_report(tmp_path, capsys):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("compare",))
    run.update_record("compare", {"stage": "compare", "status": "done", "hash": "compare-hash"})  # the CLI wants a started run
    assert main(["report", "--run-dir", str(run.root), "--accuracy-metric", "acc_norm", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "not run yet: Scores and quadrants, Schedules, Loss curves" in out
    assert "frame vs random: held-out loss -0.050" in out
    assert "Downstream acc_norm per task" in run.path("report", "index.html").read_text()
    assert sorted(p.name for p in run.path("report").glob("*.png")) == ["accuracy.png"]


# -- the page in a real browser ---------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Injected into a copy of the page: records script errors and, after load, how many images
# decoded (naturalWidth > 0), so `--dump-dom` shows what the browser saw.
PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
const consoleError = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); consoleError(...a); };
</script>"""
PROBE_BODY = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length, errors: window.__errors});
  document.body.appendChild(probe);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); browser check skipped")
def test_page_loads_every_image_in_headless_chromium(full_report, tmp_path):
    run, _ = full_report
    copied = tmp_path / "copied-report"  # the page must work once its folder is copied elsewhere
    shutil.copytree(run.path("report"), copied)
    page = copied / "index.html"
    text = page.read_text()
    page.write_text(text.replace("<head>", "<head>\n" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "\n</body>", 1))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    start = result.stdout.find('<pre id="probe">')
    assert start >= 0, f"the probe did not run; chromium printed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    probe = json.loads(html.unescape(result.stdout[start + len('<pre id="probe">'):result.stdout.index("</pre>", start)]))
    assert probe == {"images": 7, "loaded": 7, "errors": []}


# -- against the real upstream stages ---------------------------------------------------------

@pytest.mark.parametrize("stratify", [False, True])
def test_report_reads_what_partition_and_schedule_write(tmp_path, stratify):
    from framelm.partition import PartitionConfig, partition_documents
    from framelm.schedule import ScheduleConfig, build_schedules

    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(0)
    n = 300
    source = rng.choice(SOURCES, n)
    run.path("score").mkdir()
    pq.write_table(pa.table({
        "id": [f"d{i}" for i in range(n)], "source": source, "split": np.where(rng.random(n) < 0.9, "train", "heldout"),
        "n_tokens": rng.integers(20, 400, n), "ppl": np.exp(rng.normal(3, 0.6, n) + (source == "books")),
        "pd": rng.normal(0.3, 0.1, n), "status": ["ok"] * n,
    }), run.path("score", "scores.parquet"))
    partition_documents(PartitionConfig(stratify_by_source=stratify), run)
    build_schedules(ScheduleConfig(), run)
    build_report(ReportConfig(schedule_groups="quadrant" if stratify else "source"), run)
    text = run.path("report", "index.html").read_text()
    schedules = sorted(p.parent.name for p in run.root.glob("schedule/*/order.parquet"))
    assert schedules and sorted(page_images(run.path("report")).srcs) == sorted(
        ["scores.png", "quadrants.png"] + [f"schedule-{s}.png" for s in schedules])
    if stratify:  # per-source cut points: lines on the source panels only
        assert "summary.json's cut points; from the boundaries between the bins on all sources" in text
        assert "No lines on all sources" in text
    else:
        assert "quadrant cuts (summary.json's cut points)" in text
        assert "each band's height is that source's share" in text


def test_names_from_the_run_are_escaped(tmp_path):
    run = make_run(tmp_path / "run", parts=("schedule",))
    run.path("schedule", "frame").rename(run.path("schedule", "fr<i>ame"))
    build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "<i>" not in text and "Schedule 'fr&lt;i&gt;ame'" in text
    assert "schedule-fr_i_ame.png" in page_images(run.path("report")).srcs


def test_unsorted_order_is_refused_with_the_row(tmp_path):
    run = make_run(tmp_path / "run", parts=("schedule",))
    path = run.path("schedule", "frame", "order.parquet")
    t = pq.read_table(path)
    position = t["position"].to_numpy().copy()
    position[[5, 6]] = position[[6, 5]]
    pq.write_table(t.set_column(0, "position", pa.array(position)), path)
    with pytest.raises(FramelmError, match=r"frame/order\.parquet: row 6: 'position' 5 does not increase"):
        build_report(ReportConfig(), run)


@pytest.mark.parametrize("lo, hi, expected", [(250.0, 2000.0, ["500", "1,000", "2,000"]), (1.5, 3e4, ["10", "100", "1,000", "10,000"])])
def test_log_ppl_axis_labels_are_plain_numbers_that_do_not_crowd(lo, hi, expected):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from framelm.plots import _plain_log_ticks

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis, lo, hi)
    ax.set_xlim(lo, hi)
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
    assert shown == expected
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())  # matplotlib's 3x10^2, 4x10^2, ... are off


def test_figure_check_fails_on_a_figure_without_data(tmp_path):
    """assert_valid_png with figures rejects a figure whose data were removed, though its PNG alone passes."""
    from matplotlib.figure import Figure

    from framelm import plots

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.set(title="held-out loss, all held-out documents", xlabel="tokens", ylabel="loss (nats/token)")
    line, = ax.plot([1, 2, 3], [3.0, 2.5, 2.2], label="frame")
    ax.legend()
    plots._save(fig, tmp_path / "loss.png", 110)
    assert_valid_png(tmp_path / "loss.png", {"loss.png": fig})
    line.remove()
    plots._save(fig, tmp_path / "loss.png", 110)
    assert_valid_png(tmp_path / "loss.png")  # the pixels alone pass: title, labels, ticks, legend
    with pytest.raises(AssertionError, match="holds no data"):
        assert_valid_png(tmp_path / "loss.png", {"loss.png": fig})


def test_loss_plots_show_only_the_runs_compare_lists(tmp_path, monkeypatch):
    """An ad-hoc `framelm train --schedule random --seed 1` is not averaged into compare's random."""
    from framelm import plots

    run = make_run(tmp_path / "run", seeds=(0,), parts=("train", "compare"))
    d = run.path("train", "random", "seed1")
    d.mkdir(parents=True)
    (d / "log.jsonl").write_text("".join(json.dumps({"type": "train", "step": s, "tokens": s * 1024, "loss": 99.0}) + "\n"
                                         for s in range(1, 41)))
    drawn = {}
    original = plots.curves
    monkeypatch.setattr(plots, "curves", lambda path, panels, *a, **k: (drawn.setdefault(Path(path).name, panels),
                                                                        original(path, panels, *a, **k))[1])
    build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "Runs shown: train/frame/seed0, train/random/seed0 (those compare/results.json lists" in text
    assert "random/seed1" not in text
    curves = {c.label: c for c in drawn["loss.png"][0][2]}
    assert sorted(curves) == ["frame (1 seed)", "random (1 seed)"]
    assert max(curves["random (1 seed)"].mean) < 50  # seed 1's loss of 99 is not in the mean

    shutil.rmtree(run.path("compare"))  # without a compare result, every log is shown
    build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "train/random/seed1 (every train/*/seed*/log.jsonl found: there is no compare/results.json)" in text


def test_small_heldout_sets_and_quadrants_without_one_are_stated(tmp_path):
    root = tmp_path / "run"
    run = make_run(root, seeds=(0, 1), parts=("compare",))
    path = root / "compare" / "results.json"
    data = json.loads(path.read_text())
    data["heldout_sets"] = {"all": {"docs": 2, "tokens": 96}, "source/all-caps": {"docs": 400, "tokens": 90_000}}
    data["quadrants_without_heldout"] = ["Q3", "Q4"]
    path.write_text(json.dumps(data))
    counts = build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "<td>all</td><td>2</td><td>96</td>" in text and "<td>source/all-caps</td><td>400</td><td>90,000</td>" in text
    caution = "too small a sample to rank schedules on: &#x27;all&#x27; (2 documents, 96 tokens)"
    assert caution in text and "Quadrants without a held-out set (no held-out loss for them in the table): Q3, Q4." in text
    assert "too small a sample to rank schedules on: 'all' (2 documents, 96 tokens)" in counts["summary"]  # in the verdict
    assert "all-caps&#x27; (" not in text

    data["heldout_sets"]["all"] = {"docs": 500, "tokens": 200_000}
    data["quadrants_without_heldout"] = []
    path.write_text(json.dumps(data))
    counts = build_report(ReportConfig(), run)
    assert "too small a sample" not in run.path("report", "index.html").read_text() and "too small a sample" not in counts["summary"]


def test_schedule_plot_counts_stream_tokens_as_stages_yaml_does(tmp_path, monkeypatch):
    """The schedule plot's token axis is the stream's (each document's tokens and its EOS, as in
    stages.yaml and the export), so the stage lines sit where the shares change; a stage without
    documents (its budget rounded to none) still gets its line, and the later stages keep their names."""
    from framelm import plots
    from framelm.partition import PartitionConfig, partition_documents
    from framelm.schedule import ScheduleConfig, build_schedules, load_stages

    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(0)
    n = 600
    run.path("score").mkdir()
    pq.write_table(pa.table({  # short documents: the EOS is a quarter of the stream
        "id": [f"d{i}" for i in range(n)], "source": rng.choice(SOURCES, n), "split": ["train"] * n,
        "n_tokens": rng.integers(1, 6, n), "ppl": rng.lognormal(2, 0.5, n), "pd": rng.beta(2, 5, n), "status": ["ok"] * n,
    }), run.path("score", "scores.parquet"))
    partition_documents(PartitionConfig(), run)
    build_schedules(ScheduleConfig(transition="hard"), run)
    drawn = {}
    monkeypatch.setattr(plots, "schedule_areas", lambda path, title, total, centres, groups, shares, boundaries, *a:
                        drawn.update({Path(path).name: (total, centres, groups, shares, boundaries)}))
    build_report(ReportConfig(), run)
    info = load_stages(run.path("schedule", "frame", "stages.yaml"))
    total, centres, groups, shares, boundaries = drawn["schedule-frame.png"]
    assert total == info["total_tokens"]
    assert boundaries == [(s["name"], s["start_token"]) for s in info["stages"]]
    width = total / shares.shape[1]
    for s in info["stages"]:  # hard switches: a bin wholly inside a stage holds only its quadrant
        inside = (centres > s["start_token"] + width) & (centres < s["end_token"] - width)
        assert inside.any() and (shares[groups.index(s["name"]), inside] == 1).all()

    stages_yaml = run.path("schedule", "frame", "stages.yaml")
    data = yaml.safe_load(stages_yaml.read_text())
    q4 = data["stages"][1]
    data["stages"].insert(1, {**q4, "name": "empty", "end_token": q4["start_token"], "docs": 0, "tokens": 0})
    stages_yaml.write_text(yaml.safe_dump(data))
    order = pq.read_table(run.path("schedule", "frame", "order.parquet"))
    stage = order["stage"].to_numpy()
    pq.write_table(order.set_column(2, "stage", pa.array(np.where(stage >= 1, stage + 1, stage).astype(np.int32))),
                   run.path("schedule", "frame", "order.parquet"))
    build_report(ReportConfig(), run)
    assert [name for name, _ in drawn["schedule-frame.png"][4]] == ["Q3", "empty", "Q4", "Q1", "Q2"]


def test_a_schedule_made_from_an_earlier_partition_is_flagged(tmp_path):
    from framelm.partition import PartitionConfig
    from framelm.schedule import ScheduleConfig

    run = RunDir(tmp_path / "run")
    rng = np.random.default_rng(0)
    n = 300
    run.path("score").mkdir(parents=True)
    pq.write_table(pa.table({
        "id": [f"d{i}" for i in range(n)], "source": rng.choice(SOURCES, n), "split": ["train"] * n,
        "n_tokens": rng.integers(20, 400, n), "ppl": np.exp(rng.normal(3, 0.6, n)), "pd": rng.normal(0.3, 0.1, n),
        "status": ["ok"] * n,
    }), run.path("score", "scores.parquet"))
    run.update_record("score", {"stage": "score", "status": "done", "hash": "fixture"})
    run_stage("partition", PartitionConfig(ppl_quantiles=[0.33, 0.66]), run)
    run_stage("schedule", ScheduleConfig(), run)
    build_report(ReportConfig(), run)
    assert "Out of date" not in run.path("report", "index.html").read_text()
    run_stage("partition", PartitionConfig(), run)  # back to 2 x 2; the schedule is still of the 3 x 2 grid
    counts = build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "Out of date: schedule was made from an earlier result of partition" in text
    assert counts["out_of_date"] == 1 and "re-run schedule on the new partition (it was last made by: framelm schedule --run-dir" in counts["summary"]
    assert "or make partition as it was (its new result was made by: framelm partition --run-dir" in counts["summary"]
    run_stage("report", ReportConfig(), run)
    run.update_record("score", {"stage": "score", "status": "done", "hash": "rescored"})  # no file it reads changes
    assert run_stage("report", ReportConfig(), run)["out_of_date"] == 2  # re-run: partition is now out of date too
