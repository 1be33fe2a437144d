import json
import multiprocessing as mp

import pytest

from framelm.errors import FramelmError
from framelm.fsutil import atomic_path, clean_temporaries, is_done, mark_done, write_json
from framelm.rundir import RunDir


def test_paths_cannot_escape(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.path("score", "x.parquet") == tmp_path / "run" / "score" / "x.parquet"
    with pytest.raises(FramelmError, match="outside the run directory"):
        run.path("..", "elsewhere")
    with pytest.raises(FramelmError, match="outside the run directory"):
        run.path("/etc/passwd")


def test_records_round_trip_and_require(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FramelmError, match="framelm ingest --run-dir"):
        run.require("ingest")
    run.update_record("ingest", {"status": "done", "hash": "abc"})
    run.update_record("train/frame/seed0", {"status": "running", "hash": "def"})
    assert run.require("ingest")["hash"] == "abc"
    with pytest.raises(FramelmError, match="has not finished"):
        run.require("train/frame/seed0")
    assert set(json.loads((tmp_path / "manifest.json").read_text())["stages"]) == {"ingest", "train/frame/seed0"}


def _hold_lock(path, ready, release):
    run = RunDir(path)
    with run.stage_lock("score"):
        ready.set()
        release.wait(10)


def test_a_broken_manifest_is_named_with_its_line(tmp_path):
    run = RunDir(tmp_path / "run")
    run.manifest_path.write_text('{"stages": {\n  "ingest": {"status": "done",}\n}}\n')
    with pytest.raises(FramelmError, match=r"manifest.json: line 2, column .*invalid JSON.*edited by hand"):
        run.record("ingest")


def test_second_process_gets_a_clear_lock_error(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    p.start()
    try:
        assert ready.wait(10)
        with pytest.raises(FramelmError, match=r"another framelm process \(pid \d+"):
            with RunDir(tmp_path).stage_lock("score"):
                pass
    finally:
        release.set()
        p.join()
    with RunDir(tmp_path).stage_lock("score"):  # released when the holder exits
        pass


def test_atomic_path_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_done_markers_and_temporaries(tmp_path):
    shard = tmp_path / "part-00000.parquet"
    shard.write_bytes(b"x")
    assert not is_done(shard)
    mark_done(shard)
    assert is_done(shard)
    (tmp_path / "part-00001.parquet.tmp-123").write_bytes(b"half")
    assert clean_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".part-00000.parquet.done", "part-00000.parquet"]


def test_a_recorded_command_drops_one_ranks_share_and_keeps_torchrun(monkeypatch):
    from framelm.rundir import invocation

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert invocation(["score", "--run-dir", "r", "--rank", "3", "--world-size=8", "--quiet"])["argv"] == \
        ["framelm", "score", "--run-dir", "r", "--quiet"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert invocation(["train", "--run-dir", "r"])["argv"] == \
        ["torchrun", "--nproc-per-node", "2", "-m", "framelm", "train", "--run-dir", "r"]
