"""framelm.report.comparison: the verdict, the compare table and the downstream accuracy section."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest

from framelm.compare import build_table
from framelm.errors import ConfigError
from framelm.report import ReportConfig, build_report
from framelm.report.comparison import holm_adjusted, verdict_lines
from framelm.rundir import RunDir
from report_fixtures import TASKS, make_run, write_compare


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


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> running maximum 0.03, 0.06, 0.06
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjusted([0.4, 0.9]) == [0.8, 0.9] and holm_adjusted([0.02]) == [0.02] and holm_adjusted([]) == []
    assert holm_adjusted([0.01, 0.01]) == [0.02, 0.02]  # ties: the second is not left below the first


def test_several_schedules_are_judged_on_adjusted_p_values():
    # paired differences: frame's 0.05, 0.03 (t = 4 on 1 df, p = 0.156); pd_two_stage's 0.021, 0.019 (t = 20,
    # p = 0.032, significant alone). Holm: 2 x 0.032 = 0.064 for the smaller, max(0.064, 0.156) for the larger
    table = build_table(seed_runs({"frame": [3.05, 3.03], "pd_two_stage": [3.021, 3.019], "random": [3.0, 3.0]}),
                        ["frame", "pd_two_stage", "random"])
    frame, pd = verdict_lines(ReportConfig(), table, "heldout_loss/all")
    assert pd == ("pd_two_stage vs random: held-out loss +0.020 ± 0.001 nats (worse, not significant: p = 0.03, "
                  "Holm-adjusted = 0.06 for 2 comparisons, paired t test over 2 seeds)")
    assert frame.startswith("frame vs random: held-out loss +0.040 ± 0.010 nats (worse, not significant: p = 0.16, "
                            "Holm-adjusted = 0.16 for 2 comparisons")


def test_no_difference_among_several_schedules_is_called_significant_at_the_nominal_rate():
    """Three schedules, all equal to random up to seed noise: some verdict says "significant" in
    about 5% of comparisons (4.5% here; judged on unadjusted p-values, 13%)."""
    rng = np.random.default_rng(7)
    trials, hits, unadjusted = 2000, 0, 0
    names = ["frame", "sorted", "pd_two_stage"]
    for _ in range(trials):
        noise = 3.0 + rng.normal(0, 0.02, (4, 5))
        table = build_table(seed_runs({**{n: noise[k].tolist() for k, n in enumerate(names)}, "random": noise[3].tolist()}),
                            [*names, "random"])
        hits += any(", significant: p" in line for line in verdict_lines(ReportConfig(), table, "heldout_loss/all"))
        unadjusted += any(r["diff_p"] < 0.05 for r in table if r["metric"] == "heldout_loss/all" and r["diff_p"] is not None)
    assert 0.025 < hits / trials < 0.065  # 5% +- 3 binomial standard errors, less the correlation through random
    assert unadjusted / trials > 0.1  # what the adjustment prevents: a family of three, each tested alone


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


def test_one_seed_has_no_band_and_says_so(tmp_path):
    run = make_run(tmp_path / "run", seeds=(0,), parts=("train", "compare"))
    build_report(ReportConfig(), run)
    text = run.path("report", "index.html").read_text()
    assert "standard error across seeds" not in text
    assert "one seed: sampling of the task" in text


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


def test_the_unigram_floor_is_tabulated_and_cautioned_on_when_near(tmp_path):
    root = tmp_path / "run"
    run = make_run(root, seeds=(0, 1), parts=("compare",))
    path = root / "compare" / "results.json"
    data = json.loads(path.read_text())
    best = min(r["mean"] for r in data["table"] if r["metric"] == "heldout_loss/all")
    data["heldout_sets"] = {"all": {"docs": 500, "tokens": 200_000}}
    data["unigram_heldout_loss"] = {"all": best + 0.2}
    path.write_text(json.dumps(data))
    counts = build_report(ReportConfig(), run)
    text = " ".join(run.path("report", "index.html").read_text().split())
    assert f"<td>all</td><td>500</td><td>200,000</td><td>{best + 0.2:.4g}</td>" in text
    assert "unigram model&#x27;s loss" in text
    assert "the models have learned little beyond token frequencies" in text
    assert "the models have learned little beyond token frequencies" in counts["summary"]  # in the verdict

    data["unigram_heldout_loss"] = {"all": best + 3.0}
    path.write_text(json.dumps(data))
    counts = build_report(ReportConfig(), run)
    text = " ".join(run.path("report", "index.html").read_text().split())
    assert f"the best schedule {best:.3f}, 3.000 nats below it." in text and "learned little" not in text
    assert "learned little" not in counts["summary"]
