"""Every stage's command builds its flags from its config and explains itself with --help."""

import dataclasses
import re
from pathlib import Path

import pytest

from framelm.cli import main
from framelm.stages import STAGES


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_working_help(stage, capsys):
    words = list(STAGES[stage].words)
    with pytest.raises(SystemExit) as exc:
        main(words + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--run-dir" in out and "--dry-run" in out and "(default:" in out


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text('{"body": "hello"}\n')
    run_dir = tmp_path / "run"
    assert main(["ingest", "--run-dir", str(run_dir), "--inputs", str(data), "--text-field", "body", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would run" in out and "text_field: body" in out and f"- {data}" in out
    assert not (run_dir / "ingest").exists()


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["ingest", "--run-dir", str(tmp_path), "--set", "ingest.text_feild=x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("framelm: error:") and "did you mean 'text_field'" in err and "Traceback" not in err


NON_INGEST = [s for s in STAGES if s != "ingest"]


@pytest.mark.parametrize("stage", NON_INGEST)
@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "no-manifest"])
def test_stage_refuses_a_run_dir_without_a_manifest(stage, make_dir, tmp_path, capsys):
    run_dir = tmp_path / "typo1"
    if make_dir:
        run_dir.mkdir()
    assert main(list(STAGES[stage].words) + ["--run-dir", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"no run directory at {run_dir} (no manifest.json); start one with framelm ingest --run-dir {run_dir}"
            in err), err
    assert run_dir.exists() == make_dir and (not make_dir or not any(run_dir.iterdir())), "nothing may be created"


def test_ingest_still_starts_a_run_and_later_stages_accept_it(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "hello world"}\n{"text": "foo bar"}\n')
    run_dir = tmp_path / "new" / "run"
    assert main(["ingest", "--run-dir", str(run_dir), "--inputs", str(data), "--quiet"]) == 0
    assert (run_dir / "manifest.json").is_file()
    assert main(["partition", "--run-dir", str(run_dir), "--quiet", "--dry-run"]) == 0


def _help(words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(words) + ["--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping


def test_schedule_help_shows_a_working_list_override_and_its_default(tmp_path, capsys):
    out = _help(["schedule"], capsys)
    assert "strategies.KEY=VALUE" not in out
    assert "--set 'strategies=[{kind: frame}, {kind: random}]' (default: [{kind: frame}, {kind: random}])" in out
    # the form the help shows does work
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "hello world"}\n')
    run_dir = tmp_path / "run"
    assert main(["ingest", "--run-dir", str(run_dir), "--inputs", str(data), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["schedule", "--run-dir", str(run_dir), "--set", "strategies=[{kind: frame}, {kind: random}]", "--dry-run"]) == 0
    assert "kind: random" in capsys.readouterr().out


def test_schedule_help_lists_every_key_a_strategy_takes(capsys):
    from framelm.schedule import StrategyConfig

    out = _help(["schedule"], capsys)
    assert "Keys of each item of 'strategies' (StrategyConfig):" in out
    for f in dataclasses.fields(StrategyConfig):
        assert f" {f.name}: {' '.join(f.metadata['help'].split())}" in out, f.name
    assert "phase_split: two_phase: token share of each phase (sums to 1) (default: [0.6, 0.4])" in out


@pytest.mark.parametrize("stage", list(STAGES))
def test_set_example_uses_the_stage_own_fields(stage, capsys):
    import dataclasses
    import re

    out = _help(STAGES[stage].words, capsys)
    (example,) = re.findall(r"\(repeatable\), e\.g\. --set '?([\w.]+)=", out)
    top = example.split(".")[0]
    assert top in {f.name for f in dataclasses.fields(STAGES[stage].config_class())}, example


def test_a_default_is_shown_once(capsys):
    out = _help(["score"], capsys)
    assert "(default RUN/refmodels/weak)" in out and "(default RUN/refmodels/weak) (default:" not in out
    assert "(default: $WORLD_SIZE, else 1) (default:" not in out


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_says_what_the_stage_reads_and_writes(stage, capsys):
    out = _help(STAGES[stage].words, capsys)
    assert re.search(r"Reads [^;]+; writes [^.]*RUN/" + stage + "/", out), out[:400]


def test_pipeline_unknown_key_names_the_yaml_file(tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ncompare:\n  model: 1\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: unknown key 'compare.model'; allowed keys of compare:" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section", ["foo", "[builtin]"])
def test_a_config_section_that_is_no_mapping_is_a_user_error_naming_the_file(tmp_path, capsys, section):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ningest: {section}\n")
    assert main(["ingest", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"framelm: error: {cfg}: 'ingest' must be a mapping of keys to values"), err


def test_a_stage_command_names_the_config_file_only_for_the_file_own_mistakes(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ningest: {{inputs: [builtin], dedupe: true}}\n")
    assert main(["ingest", "--config", str(cfg), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"framelm: error: {cfg}: unknown key 'ingest.dedupe'; did you mean 'dedup'")
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ningest: {{inputs: [builtin]}}\n")
    assert main(["ingest", "--config", str(cfg), "--quiet", "--docs-per-shard", "-3"]) == 2
    err = capsys.readouterr().err
    assert "docs_per_shard" in err and str(cfg) not in err  # the flag is wrong, not the file


def test_run_dir_flag_serves_a_config_file_without_one(tmp_path, capsys):
    cfg = tmp_path / "shared.yaml"
    cfg.write_text("ingest: {inputs: [builtin], builtin_max_chars: 1000}\n")
    assert main(["ingest", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "builtin_max_chars: 1000" in capsys.readouterr().out
    assert main(["ingest", "--config", str(cfg), "--quiet"]) == 2
    assert f"{cfg}: missing required key 'run_dir'" in capsys.readouterr().err


def test_an_override_for_a_stage_the_pipeline_does_not_run_is_refused(capsys):
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert main(["run", str(demo), "--set", "train.lr=1e-3", "--dry-run"]) == 2  # compare trains; no train stage
    err = capsys.readouterr().err
    assert f"override 'train.lr=1e-3': {demo} does not run stage 'train'" in err
    assert "did you mean compare.train.lr=1e-3?" in err


@pytest.mark.shared_data
def test_the_mixed_corpus_experiment_config_resolves(shared_data, monkeypatch, capsys):
    # its inputs are paths relative to the repository root, as RESULTS.md runs it
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    assert main(["run", "configs/mixed-corpus.yaml", "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sample_fraction: 0.1" in out and "- reverse" in out


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path):
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # as `framelm ... --dry-run | head -1` once head has its line
    try:
        proc = subprocess.run([sys.executable, "-m", "framelm", "ingest", "--run-dir", str(tmp_path / "run"), "--inputs",
                               "builtin", "--dry-run", "--quiet"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


def test_a_broken_pipe_that_is_not_stdout_is_a_failure(monkeypatch, tmp_path):
    import framelm.cli as cli

    def worker_died(args):
        raise BrokenPipeError("a worker process went away")

    monkeypatch.setattr(cli, "_run_stage_command", worker_died)
    with pytest.raises(BrokenPipeError, match="worker process"):
        cli.main(["ingest", "--run-dir", str(tmp_path / "run"), "--inputs", "builtin"])
