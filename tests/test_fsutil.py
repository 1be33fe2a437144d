import os
import time

import pytest

from framelm import fsutil
from framelm.errors import FramelmError


def _counting_hashes(monkeypatch) -> list:
    calls = []
    real = fsutil.sha256_file
    monkeypatch.setattr(fsutil, "sha256_file", lambda p: calls.append(p) or real(p))
    return calls


def test_content_hashes_see_every_byte_and_reuse_hashes_of_unchanged_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "RECENT_NS", -1)  # files written just now count as settled
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * (3 << 20))
    cache = tmp_path / "cache" / "hashes.json"
    hashes = fsutil.ContentHashes(cache)
    first = hashes.fingerprint(path)
    assert first["bytes"] == 3 << 20 and first["sha256"] == fsutil.sha256_file(path)
    hashes.save()

    calls = _counting_hashes(monkeypatch)
    assert fsutil.ContentHashes(cache).fingerprint(path) == first and calls == []  # a stat, no read

    # The same size, a byte in the middle changed, the old mtime put back (as `cp -p` does): only
    # the bytes and the ctime differ, and the hash changes.
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[3 << 19] = ord("b")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = fsutil.ContentHashes(cache).fingerprint(path)
    assert second["sha256"] != first["sha256"] and len(calls) == 1


def test_small_and_recently_modified_files_are_not_remembered(tmp_path, monkeypatch):
    small, fresh = tmp_path / "small.txt", tmp_path / "fresh.bin"
    small.write_text("a document")
    fresh.write_bytes(b"x" * (2 << 20))
    old = time.time_ns() - 60_000_000_000
    os.utime(small, ns=(old, old))
    cache = tmp_path / "hashes.json"
    hashes = fsutil.ContentHashes(cache)
    hashes.fingerprint(small), hashes.fingerprint(fresh)
    hashes.save()
    assert not cache.exists()  # nothing both large and settled enough to remember
    calls = _counting_hashes(monkeypatch)
    fsutil.ContentHashes(cache).fingerprint(fresh)
    assert len(calls) == 1


def test_temporaries_of_running_processes_are_kept(tmp_path):
    import subprocess
    import sys

    with fsutil.atomic_path(tmp_path / "mine.bin") as tmp:
        tmp.write_bytes(b"done")
        own_tag = tmp.name.split(fsutil.TMP_TAG)[1]  # host-pid of this process
    host = own_tag.rpartition("-")[0]
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead_pid = int(finished.stdout)
        running = tmp_path / f"part-1.parquet{fsutil.TMP_TAG}{host}-{sleeper.pid}"  # another rank, still writing
        killed = tmp_path / f"part-2.parquet{fsutil.TMP_TAG}{host}-{dead_pid}"
        elsewhere = tmp_path / f"part-3.parquet{fsutil.TMP_TAG}other-machine-{dead_pid}"
        old_style = tmp_path / f"part-4.parquet{fsutil.TMP_TAG}123"
        abandoned = tmp_path / f"part-5.parquet{fsutil.TMP_TAG}other-machine-{dead_pid}"
        for p in (running, killed, elsewhere, old_style, abandoned):
            p.write_bytes(b"half")
        hours_ago = time.time() - 2 * fsutil.FOREIGN_TEMPORARY_S
        os.utime(abandoned, (hours_ago, hours_ago))
        assert fsutil.clean_temporaries(tmp_path) == 3
        assert running.exists() and elsewhere.exists()
        assert not killed.exists() and not old_style.exists() and not abandoned.exists()
    finally:
        sleeper.kill()


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b'{"a": 1,\n "b": }\n', r"line 2, column 7: invalid JSON"),
    (b'{"a": "\xff"}', "not UTF-8 text"),
    (b"[1, 2]", "expected a JSON object, found list"),
])
def test_read_json_names_the_file_the_fault_and_the_remedy(tmp_path, content, message):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FramelmError, match=f"{path}.*{message}.*; re-run it"):
        fsutil.read_json(path, "re-run it")


def test_read_json_reads_an_object(tmp_path):
    (tmp_path / "x.json").write_text('{"a": [1, 2]}')
    assert fsutil.read_json(tmp_path / "x.json") == {"a": [1, 2]}
