"""The stage runner: skip when up to date, re-run on config or upstream change, resume otherwise."""

from dataclasses import dataclass

import pytest

from framelm import pipeline
from framelm.cli import main
from framelm.config import StageConfig, field
from framelm.errors import FramelmError
from framelm.rundir import RunDir
from framelm.stages import Stage

CALLS: list[str] = []


@dataclass
class ToyConfig(StageConfig):
    value: int = field(1, help="a number that changes the output")
    workers: int = field(1, help="execution detail", hash=False)


def toy_source(cfg, run):
    CALLS.append("source")
    (run.path("source") / "out.txt").write_text(str(cfg.value))
    return {"value": cfg.value}


def toy_sink(cfg, run):
    CALLS.append("sink")
    out = run.path("sink") / "out.txt"
    assert not out.exists(), "a changed upstream must clear the old outputs first"
    out.write_text((run.path("source") / "out.txt").read_text() * 2)
    return {"summary": "sink finished"}


@pytest.fixture(autouse=True)
def toy_stages(monkeypatch):
    stages = {
        "source": Stage("source", f"{__name__}:ToyConfig", f"{__name__}:toy_source", (), "toy source"),
        "sink": Stage("sink", f"{__name__}:ToyConfig", f"{__name__}:toy_sink", ("source",), "toy sink"),
    }
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr(pipeline, "ORDER", list(stages))
    CALLS.clear()


def test_skip_rerun_and_downstream_invalidation(tmp_path):
    run = RunDir(tmp_path)
    pipeline.run_stage("source", ToyConfig(value=1), run)
    pipeline.run_stage("sink", ToyConfig(), run)
    pipeline.run_stage("source", ToyConfig(value=1, workers=4), run)  # same hash: skipped
    pipeline.run_stage("sink", ToyConfig(), run)
    assert CALLS == ["source", "sink"]
    pipeline.run_stage("source", ToyConfig(value=2), run)  # changed config re-runs ...
    pipeline.run_stage("sink", ToyConfig(), run)  # ... and so does what depends on it
    assert CALLS == ["source", "sink", "source", "sink"]
    assert (tmp_path / "sink" / "out.txt").read_text() == "22"
    rec = run.record("sink")
    assert rec["status"] == "done" and rec["counts"] == {"summary": "sink finished"}
    assert rec["upstream"] == {"source": run.record("source")["hash"]}
    assert "torch" in rec["versions"] and rec["seconds"] >= 0


def test_downstream_needs_upstream(tmp_path):
    with pytest.raises(FramelmError, match="stage 'source' has not finished"):
        pipeline.run_stage("sink", ToyConfig(), RunDir(tmp_path))


def test_interrupted_run_keeps_its_outputs(tmp_path):
    run = RunDir(tmp_path)
    pipeline.run_stage("source", ToyConfig(value=1), run)
    rec = run.record("source")
    run.update_record("source", {**rec, "status": "running"})  # as if killed after writing a shard
    (tmp_path / "source" / "shard-0.done").write_text("")
    pipeline.run_stage("source", ToyConfig(value=1), run)
    assert (tmp_path / "source" / "shard-0.done").exists()
    pipeline.run_stage("source", ToyConfig(value=3), run)  # another config: old outputs cleared
    assert not (tmp_path / "source" / "shard-0.done").exists()


def test_run_pipeline_from_yaml_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in a config are relative to the working directory
    cfg = tmp_path / "p.yaml"
    cfg.write_text("run_dir: out\nsource: {value: 5}\nsink: {}\n")
    assert main(["run", str(cfg), "--quiet"]) == 0
    assert (tmp_path / "out" / "sink" / "out.txt").read_text() == "55"
    assert "sink finished" in capsys.readouterr().out
    cfg.write_text("run_dir: out\nsource: {valu: 5}\n")
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert "unknown key 'source.valu'; did you mean 'value'" in capsys.readouterr().err
    cfg.write_text("run_dir: out\nsorce: {}\n")
    assert main(["run", str(cfg), "--quiet"]) == 2
    assert "unknown top-level key 'sorce'" in capsys.readouterr().err
