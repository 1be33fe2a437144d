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
    if cfg.value < 0:
        raise FramelmError(f"value {cfg.value} is negative")  # bad input found after some writing
    if cfg.value == 99:
        raise KeyboardInterrupt  # stands in for a kill mid-run
    return {"value": cfg.value}


def toy_sink(cfg, run):
    CALLS.append("sink")
    out = run.path("sink") / "out.txt"
    assert not out.exists(), "a changed upstream must clear the old outputs first"
    out.write_text((run.path("source") / "out.txt").read_text() * 2)
    return {"summary": "sink finished"}


def toy_tail(cfg, run):
    CALLS.append("tail")
    return {}


@dataclass
class ReaderConfig(ToyConfig):
    remakes_inputs = True

    def input_fingerprint(self, run):
        seen = run.root / "seen.txt"
        return {"seen": seen.read_text() if seen.exists() else None}


def toy_reader(cfg, run):
    CALLS.append("reader")
    (run.root / "seen.txt").write_text("mine")  # remakes what it reads, as compare re-trains replaced runs
    return {}


@pytest.fixture(autouse=True)
def toy_stages(monkeypatch):
    stages = {
        "source": Stage("source", f"{__name__}:ToyConfig", f"{__name__}:toy_source", (), "toy source"),
        "sink": Stage("sink", f"{__name__}:ToyConfig", f"{__name__}:toy_sink", ("source",), "toy sink"),
        "tail": Stage("tail", f"{__name__}:ToyConfig", f"{__name__}:toy_tail", ("sink",), "toy tail"),
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
    assert CALLS == ["source", "source"]  # the interrupted run ran again ...
    assert (tmp_path / "source" / "shard-0.done").exists()  # ... keeping what it had finished
    pipeline.run_stage("source", ToyConfig(value=3), run)  # another config: old outputs cleared
    assert CALLS == ["source", "source", "source"]
    assert not (tmp_path / "source" / "shard-0.done").exists()
    assert not (tmp_path / pipeline.PREVIOUS).exists()  # the set-aside result went with its folders


def test_a_failing_rerun_keeps_the_previous_result(tmp_path):
    run = RunDir(tmp_path)
    pipeline.run_stage("source", ToyConfig(value=1), run)
    done = run.record("source")
    with pytest.raises(FramelmError, match="value -1 is negative") as info:
        pipeline.run_stage("source", ToyConfig(value=-1), run)
    assert "previous result of source is unchanged" in str(info.value)
    assert (tmp_path / "source" / "out.txt").read_text() == "1"
    assert run.record("source") == done
    assert sorted(p.name for p in (tmp_path / "source").iterdir()) == [pipeline.HASH_FILE, "out.txt"]
    pipeline.run_stage("source", ToyConfig(value=1), run)
    assert CALLS == ["source", "source"]  # still up to date


def test_a_failing_first_run_is_recorded_as_failed(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FramelmError):
        pipeline.run_stage("source", ToyConfig(value=-2), run)
    rec = run.record("source")
    assert rec["status"] == "failed" and "value -2 is negative" in rec["error"]


def test_the_old_config_after_a_killed_new_run_takes_its_result_back(tmp_path):
    run = RunDir(tmp_path)
    pipeline.run_stage("source", ToyConfig(value=1), run)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("source", ToyConfig(value=99), run)
    assert run.record("source")["status"] == "interrupted"
    assert (tmp_path / pipeline.PREVIOUS / "source" / "out.txt").read_text() == "1"
    assert pipeline.run_stage("source", ToyConfig(value=1), run) == {"value": 1}
    assert CALLS == ["source", "source"]  # taken back, not recomputed
    assert (tmp_path / "source" / "out.txt").read_text() == "1" and run.record("source")["status"] == "done"
    assert not (tmp_path / pipeline.PREVIOUS / "source").exists()


def test_a_stale_upstream_is_refused(tmp_path):
    run = RunDir(tmp_path)
    pipeline.run_stage("source", ToyConfig(value=1), run)
    pipeline.run_stage("sink", ToyConfig(), run)
    pipeline.run_stage("tail", ToyConfig(), run)
    pipeline.run_stage("source", ToyConfig(value=2), run)  # sink not re-run: it holds value 1
    with pytest.raises(FramelmError, match=r"stage 'sink' .* is out of date: it was made from another result of "
                                           r"'source'.*framelm sink --run-dir"):
        pipeline.run_stage("tail", ToyConfig(), run)
    pipeline.run_stage("sink", ToyConfig(), run)
    pipeline.run_stage("tail", ToyConfig(), run)
    assert CALLS == ["source", "sink", "tail", "source", "sink", "tail"]


def test_hints_name_the_command_that_makes_a_stage(tmp_path):
    run = RunDir(tmp_path)
    assert run.command_for("tokenizer") == f"framelm tokenizer train --run-dir {run.root}"
    assert run.command_for("train/frame/seed3") == f"framelm train --run-dir {run.root} --schedule frame --seed 3"
    assert run.command_for("eval/random/seed1") == f"framelm eval --run-dir {run.root} --model train/random/seed1"
    # an evaluation named otherwise, or a seed-like instance of another stage, names no training to evaluate
    assert run.command_for("eval/mine") == f"framelm eval --run-dir {run.root}"
    assert run.command_for("export/frame/seed3") == f"framelm export --run-dir {run.root}"


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


@dataclass
class NamedToyConfig(ToyConfig):
    name: str = field("a/b", help="instance name, nested like train's schedule/seed")

    def instance(self) -> str | None:
        return self.name


def test_a_nested_instance_leaves_no_empty_set_aside_folders(tmp_path):
    run = RunDir(tmp_path)
    pipeline.run_stage("source", NamedToyConfig(value=1), run)
    pipeline.run_stage("source", NamedToyConfig(value=2), run)  # sets value 1 aside, then drops it
    assert CALLS == ["source", "source"]
    assert run.record("source/a/b")["counts"] == {"value": 2}
    assert not (tmp_path / pipeline.PREVIOUS).exists()


def test_a_stale_stage_hint_repeats_the_command_that_ran_it(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "p.yaml").write_text("run_dir: out\nsource: {value: 5}\nsink: {}\ntail: {}\n")
    assert main(["run", "p.yaml", "--quiet", "--force"]) == 0
    (work / "q.yaml").write_text("run_dir: out\nsource: {value: 6}\n")
    assert main(["run", "q.yaml", "--quiet"]) == 0  # sink and tail still hold value 5
    with pytest.raises(FramelmError, match=r"stage 'sink' .* out of date.*re-run it first: framelm run p\.yaml --quiet$"):
        pipeline.run_stage("tail", ToyConfig(), RunDir(work / "out"))
    monkeypatch.chdir(tmp_path)  # elsewhere, the hint goes back to the folder relative paths are read from
    with pytest.raises(FramelmError, match=rf"re-run it first: \(cd {work} && framelm run p\.yaml --quiet\)$"):
        pipeline.run_stage("tail", ToyConfig(), RunDir(work / "out"))
    assert RunDir(work / "out").record("source")["command"] == {"argv": ["framelm", "run", "q.yaml", "--quiet"], "cwd": str(work)}


@dataclass
class RankedToyConfig(ToyConfig):
    world_size: int = field(2, help="ranks sharing the stage's folder, as score's", hash=False)


def test_a_failing_distributed_rerun_keeps_the_previous_result_set_aside(tmp_path):
    run = RunDir(tmp_path)
    pipeline.run_stage("source", RankedToyConfig(value=1), run)
    done = run.record("source")
    with pytest.raises(FramelmError, match=r"value -1 is negative\n\(the previous result of source is kept in .*"
                                           r"\.previous/source; running its command again puts it back\)"):
        pipeline.run_stage("source", RankedToyConfig(value=-1), run)
    assert (tmp_path / pipeline.PREVIOUS / "source" / "out.txt").read_text() == "1"
    assert run.record("source")["status"] == "failed"
    assert pipeline.run_stage("source", RankedToyConfig(value=1), run) == {"value": 1}
    assert CALLS == ["source", "source"]  # taken back, not recomputed
    assert run.record("source") == done and not (tmp_path / pipeline.PREVIOUS).exists()


@dataclass
class RankToyConfig(RankedToyConfig):
    rank: int = field(0, help="this process's rank; each rank takes its own stage lock, as score's", hash=False)

    def lock_name(self, key: str) -> str:
        return f"{key}.rank{self.rank}"


def test_another_rank_never_sees_a_taken_back_result_without_its_record(tmp_path, monkeypatch):
    import contextlib

    run = RunDir(tmp_path)
    pipeline.run_stage("source", RankToyConfig(value=1), run)
    done = run.record("source")
    with pytest.raises(FramelmError):
        pipeline.run_stage("source", RankToyConfig(value=-1), run)  # value 1 stays set aside
    take_back, manifest_lock = pipeline._take_back, RunDir._manifest_lock
    rank1: dict[str, object] = {"state": "waiting"}

    def taking_back(*args):
        rank1["state"] = "due"
        return take_back(*args)

    @contextlib.contextmanager
    def rank_1_starts_when_rank_0_lets_go(self):
        with manifest_lock(self):
            yield
        if rank1["state"] == "due":  # rank 0 has just moved the result back: rank 1 comes in now
            rank1["state"] = "running"
            rank1["counts"] = pipeline.run_stage("source", RankToyConfig(value=1, rank=1), RunDir(tmp_path))

    monkeypatch.setattr(pipeline, "_take_back", taking_back)
    monkeypatch.setattr(RunDir, "_manifest_lock", rank_1_starts_when_rank_0_lets_go)
    assert pipeline.run_stage("source", RankToyConfig(value=1), run) == {"value": 1}
    assert rank1["counts"] == {"value": 1}
    assert CALLS == ["source", "source"]  # rank 1 found it finished too, not an interrupted run to redo
    assert run.record("source") == done


def test_a_pipeline_dry_run_says_what_a_changed_upstream_makes_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("run_dir: out\nsource: {value: 1}\nsink: {}\ntail: {}\n")
    assert main(["run", "p.yaml", "--quiet"]) == 0
    (tmp_path / "p.yaml").write_text("run_dir: out\nsource: {value: 2}\nsink: {}\ntail: {}\n")
    capsys.readouterr()
    assert main(["run", "p.yaml", "--quiet", "--dry-run"]) == 0
    planned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    assert main(["run", "p.yaml", "--quiet"]) == 0
    assert CALLS == ["source", "sink", "tail"] * 2  # all three ran again ...
    run = RunDir(tmp_path / "out")
    assert planned == [f"# {k}: would run; hash {run.record(k)['hash']}" for k in ("source", "sink", "tail")]  # ... as said
    capsys.readouterr()
    assert main(["run", "p.yaml", "--quiet", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("up to date (would skip)") == 3


@pytest.mark.parametrize("run_dir, message", [
    ("", "missing required key 'run_dir'"),
    ("'  '", "'run_dir' must be the path of the run directory"),
    ("[out]", "'run_dir' must be the path of the run directory"),
])
def test_a_run_dir_that_is_no_path_is_refused(tmp_path, capsys, monkeypatch, run_dir, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(f"run_dir: {run_dir}\nsource: {{value: 1}}\n")
    assert main(["run", "p.yaml", "--quiet"]) == 2
    assert f"p.yaml: {message}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "p.yaml"]  # no folder named 'None' or "['out']"


def test_stages_and_only_must_name_stages_the_pipeline_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("run_dir: out\nstages: source\n")
    assert main(["run", "p.yaml", "--quiet"]) == 2
    assert "'stages' must be a list of stage names from source, sink, tail; got 'source'" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("run_dir: out\nsource: {value: 1}\nsink: {}\n")
    assert main(["run", "p.yaml", "--quiet", "--only", "snk"]) == 2
    assert "--only snk: p.yaml does not run 'snk'; its stages are source, sink" in capsys.readouterr().err
    assert main(["run", "p.yaml", "--quiet", "--set", "tail.value=3"]) == 2
    assert "override 'tail.value=3': p.yaml does not run stage 'tail' (it runs source, sink)" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("run_dir: out\nstages: [source]\nsource: {value: 1}\nsink: {}\n")
    assert main(["run", "p.yaml", "--quiet", "--set", "sink.value=3"]) == 2  # listed stages only: not ignored
    assert "does not run stage 'sink' (it runs source)" in capsys.readouterr().err
    assert CALLS == []


def add_stage(stage: Stage) -> None:
    pipeline.STAGES[stage.name] = stage  # the fixture's own dict and list: undone after the test
    pipeline.ORDER.append(stage.name)


def test_a_stage_that_remakes_its_inputs_is_recorded_as_it_leaves_them(tmp_path):
    add_stage(Stage("reader", f"{__name__}:ReaderConfig", f"{__name__}:toy_reader", (), "toy reader"))
    run = RunDir(tmp_path)
    pipeline.run_stage("reader", ReaderConfig(), run)
    pipeline.run_stage("reader", ReaderConfig(), run)
    assert CALLS == ["reader"]  # not once more for the inputs it remade itself
    assert run.record("reader")["hash"] == pipeline.stage_hash("reader", ReaderConfig(), run)[0]
    for _ in range(2):  # another writer replaces its input, the same way each time
        (tmp_path / "seen.txt").write_text("other")
        pipeline.run_stage("reader", ReaderConfig(), run)
    assert CALLS == ["reader"] * 3


@dataclass
class OwnerConfig(ToyConfig):
    source_value: int = field(1, help="value of the source run this stage makes itself, as compare makes train runs")

    def owned_stages(self):
        return [("source", ToyConfig(value=self.source_value))]


def test_two_sections_that_make_one_key_differently_are_refused(tmp_path):
    add_stage(Stage("owner", f"{__name__}:OwnerConfig", f"{__name__}:toy_tail", (), "toy owner"))
    config = tmp_path / "p.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nsource: {{value: 1}}\nowner: {{source_value: 2}}\n")
    with pytest.raises(pipeline.ConfigError, match=r"p\.yaml: sections 'source' and 'owner' both make source, "
                                                    r"with different settings \(value\).*leave out the 'source' section"):
        pipeline.run_pipeline(config)
    assert CALLS == []
    pipeline.run_pipeline(config, ["owner.source_value=1"])  # the same settings make one result
    assert CALLS == ["source", "tail"]


@dataclass
class PartsConfig(ToyConfig):
    other: int = field(1, help="what the second part holds")


def toy_parts(cfg, run):
    CALLS.append("parts")
    return {"parts": {"first": f"first-{cfg.value}", "second": f"second-{cfg.other}"}}


@dataclass
class FirstPartConfig(ToyConfig):
    def upstream(self):
        return ("parts#first",)


@dataclass
class MissingPartConfig(ToyConfig):
    def upstream(self):
        return ("parts#third",)


def test_a_stage_that_reads_one_part_of_its_upstream_stays_current_when_another_part_changes(tmp_path):
    add_stage(Stage("parts", f"{__name__}:PartsConfig", f"{__name__}:toy_parts", ("source",), "toy parts"))
    add_stage(Stage("first", f"{__name__}:FirstPartConfig", f"{__name__}:toy_tail", ("parts",), "toy reader of a part"))
    run = RunDir(tmp_path)
    pipeline.run_stage("source", ToyConfig(), run)
    CALLS.clear()
    pipeline.run_stage("parts", PartsConfig(), run)
    pipeline.run_stage("first", FirstPartConfig(), run)
    assert run.record("first")["upstream"] == {"parts#first": "first-1"}
    pipeline.run_stage("parts", PartsConfig(other=2), run)  # a new hash, the part it reads unchanged
    assert pipeline.stale_records(run) == []
    pipeline.run_stage("first", FirstPartConfig(), run)
    assert CALLS == ["parts", "tail", "parts"]  # up to date
    pipeline.run_stage("parts", PartsConfig(value=5, other=2), run)
    assert pipeline.stale_records(run) == [("first", "parts")]
    pipeline.run_stage("first", FirstPartConfig(), run)
    assert CALLS == ["parts", "tail", "parts", "parts", "tail"]
    with pytest.raises(FramelmError, match=r"stage 'parts' in .* holds no 'third' \(it holds: first, second\)"):
        pipeline.stage_hash("first", MissingPartConfig(), run)
    pipeline.run_stage("source", ToyConfig(value=7), run)  # what the part was made from changes
    with pytest.raises(FramelmError, match=r"stage 'parts' .* is out of date: it was made from another result of 'source'"):
        pipeline.run_stage("first", FirstPartConfig(), run)


def test_a_dry_run_says_when_a_part_decides(tmp_path, capsys):
    add_stage(Stage("parts", f"{__name__}:PartsConfig", f"{__name__}:toy_parts", (), "toy parts"))
    add_stage(Stage("first", f"{__name__}:FirstPartConfig", f"{__name__}:toy_tail", ("parts",), "toy reader of a part"))
    add_stage(Stage("reader", f"{__name__}:ReaderConfig", f"{__name__}:toy_reader", (), "reads whatever exists"))
    config = tmp_path / "p.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\nparts: {{other: 1}}\nfirst: {{}}\nreader: {{}}\n")
    pipeline.run_pipeline(config)
    capsys.readouterr()
    pipeline.run_pipeline(config, dry_run=True)
    assert capsys.readouterr().out.count("up to date (would skip)") == 3
    pipeline.run_pipeline(config, ["parts.other=2"], dry_run=True)
    out = capsys.readouterr().out
    assert "# parts: would run;" in out and "# first: would run unless what it reads of parts comes out unchanged;" in out
    assert "# reader: would run;" in out  # what it reads is remade first


@dataclass
class ChangingInputConfig(ReaderConfig):
    remakes_inputs = False  # what it reads changed under it (a file still being written), not by its own doing


def test_an_input_that_changes_during_a_run_makes_the_next_run_run_again(tmp_path):
    add_stage(Stage("changing", f"{__name__}:ChangingInputConfig", f"{__name__}:toy_reader", (), "toy"))
    run = RunDir(tmp_path)
    pipeline.run_stage("changing", ChangingInputConfig(), run)
    pipeline.run_stage("changing", ChangingInputConfig(), run)
    assert CALLS == ["reader", "reader"]  # recorded with the hash of the input it started from
