"""Hostile configuration: unknown keys, negative budgets, wrong types, and names that would
make a stage write (or clear!) a folder outside its own. Each is refused before anything is
written, with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from faults.harness import tree_digests

from .conftest import assert_user_error, write_jsonl

BAD_CONFIGS = [
    (["tokenizer", "train", "--vocab-size", "-1"], ("vocab_size", "-1")),
    (["tokenize", "--set", "dtype=int8"], ("tokenize.dtype", "int8", "uint16")),
    (["tokenize", "--set", "num_workers=0"], ("num_workers", "0")),
    (["score", "--docs-per-shard", "-3"], ("docs_per_shard", "-3")),
    (["score", "--set", "ppl_axiss=weak"], ("unknown key 'score.ppl_axiss'", "did you mean 'ppl_axis'")),
    (["partition", "--set", "ppl_quantiles=[0.7, 0.3]"], ("ppl_quantiles",)),
    (["schedule", "--set", "total_tokens=-100"], ("total_tokens", "-100")),
    (["schedule", "--set", "strategies=[{kind: frame, nme: x}]"], ("unknown key 'schedule.strategies[0].nme'", "did you mean 'name'")),
    (["schedule", "--set", "strategies=[{kind: two_phase, blends: [{web: 1.5}, {web: -0.5}]}]"], ("blends",)),
    (["export", "--set", "formats=[stream, pdf]"], ("formats", "pdf")),
    (["train", "--set", "max_tokens=-1"], ("max_tokens", "-1")),
    (["train", "--set", "lr=-0.1"], ("lr", "-0.1")),
    (["train", "--set", "model.n_layerz=2"], ("train.model.n_layerz",)),
    (["eval", "--set", "heldout_tokens=-5"], ("heldout_tokens", "-5")),
    (["report", "--set", "dpi=-1"], ("dpi",)),
]


@pytest.mark.parametrize("argv, fragments", BAD_CONFIGS, ids=[" ".join(a[:2]) + ":" + a[-1] for a, _ in BAD_CONFIGS])
def test_bad_config_is_refused_naming_the_key(framelm_cli, tmp_path, argv, fragments):
    assert_user_error(framelm_cli(*argv, "--run-dir", tmp_path / "run", "--quiet"), *fragments)
    assert not [p for p in (tmp_path / "run").glob("*") if p.name not in (".locks", "manifest.json")], \
        "a refused config must not create stage outputs"


def test_config_file_with_unknown_top_level_key(framelm_cli, tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("run_dir: run\ningest:\n  inputs: [builtin]\ntokenise:\n  dtype: uint16\n")
    assert_user_error(framelm_cli("run", cfg), str(cfg), "unknown top-level key 'tokenise'")


def test_config_file_with_a_syntax_error_names_the_line(framelm_cli, tmp_path):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("run_dir: run\ningest:\n  inputs: [builtin\n  dedup: true\n")
    assert_user_error(framelm_cli("run", cfg), str(cfg), "line ")


ESCAPING_NAMES = [
    (["eval", "--name", "../ingest", "--model", "/nonexistent"], "must be a relative folder name"),
    (["eval", "--name", "x/../../ingest", "--model", "/nonexistent"], "must be a relative folder name"),
    (["eval", "--name", "/tmp/elsewhere", "--model", "/nonexistent"], "must be a relative folder name"),
    (["export", "--schedules", "../ingest"], "'schedules' entry '../ingest'"),
    (["train", "--schedule", "../ingest"], "'schedule' = '../ingest'"),
    (["schedule", "--set", "strategies=[{kind: frame, name: ../ingest}]"], "'name' = '../ingest'"),
]


@pytest.mark.parametrize("argv, fragment", ESCAPING_NAMES, ids=[" ".join(a[:3]) for a, _ in ESCAPING_NAMES])
def test_names_cannot_leave_the_stage_folder(framelm_cli, tmp_path, argv, fragment):
    """'../ingest' as a run name would make run_stage clear RUN/ingest as a stale output folder."""
    run = tmp_path / "run"
    src = write_jsonl(tmp_path / "web.jsonl", [{"id": "a", "text": "a document to protect"}])
    assert framelm_cli("ingest", "--run-dir", run, "--quiet", "--inputs", src).code == 0
    from framelm.rundir import RunDir

    for upstream in ("tokenize", "partition", "schedule", "export"):  # pretend the upstream stages finished
        RunDir(run).update_record(upstream, {"status": "done", "hash": upstream})
    before = tree_digests(run / "ingest")
    assert_user_error(framelm_cli(*argv, "--run-dir", run, "--quiet"), fragment)
    assert tree_digests(run / "ingest") == before
    assert not (tmp_path / "elsewhere").exists() and not Path("/tmp/elsewhere").exists()
