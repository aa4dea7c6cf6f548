"""The host's local copy: crash-safe full loads, damaged and foreign files rebuilt."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import pytest

from edge.store.localcopy import CopyWriter, LocalCopy


def _fill(path: Path, count: int, value: bytes = b"v1", revision: int = 7) -> None:
    copy = LocalCopy(path, "file:/s", rebuild=True)
    writer = CopyWriter(copy)
    writer.begin_full()
    writer.apply([(f"domains/n{i}.test", value) for i in range(count)], 0)
    writer.end_full(revision)
    writer.close()
    copy.close()


def test_full_load_commits_at_once_and_drops_what_it_did_not_see(tmp_path: Path) -> None:
    _fill(tmp_path, 10)
    copy = LocalCopy(tmp_path, "file:/s")
    writer = CopyWriter(copy)
    writer.begin_full()
    writer.apply([("domains/n1.test", b"v2")], 0)
    writer.flush()
    assert copy.get("domains/n1.test") == b"v1"  # readers see the previous copy until the commit
    writer.apply([("domains/new.test", b"x")], 0)
    writer.end_full(9, keep=frozenset({"domains/n2.test"}))
    writer.flush()
    assert dict(copy.items("domains/")) == {"domains/n1.test": b"v2", "domains/n2.test": b"v1",
                                            "domains/new.test": b"x"}
    assert copy.state()[0] == 9
    writer.close()


def test_truncated_file_is_rebuilt_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fill(tmp_path, 2000, b"x" * 2000)
    data = tmp_path / "data.mdb"
    os.truncate(data, data.stat().st_blocks * 512 // 2)  # half of what it holds (the file is sparse)
    with pytest.raises(lmdb.Error):
        LocalCopy(tmp_path, "file:/s")  # a reader never reads past the end (SIGBUS)
    with caplog.at_level(logging.ERROR):
        copy = LocalCopy(tmp_path, "file:/s", rebuild=True)
    assert copy.state()[2] == 0
    assert [r.message for r in caplog.records if "truncated" in r.message] != []
    assert len(caplog.records) == 1


@pytest.mark.parametrize("damage", ["garbage", "foreign"])
def test_foreign_or_garbage_file_is_rebuilt(tmp_path: Path, damage: str) -> None:
    _fill(tmp_path, 5)
    if damage == "garbage":
        (tmp_path / "data.mdb").write_bytes(b"not lmdb" * 4096)
        (tmp_path / "lock.mdb").unlink()
    copy = LocalCopy(tmp_path, "file:/s" if damage == "garbage" else "etcd:other/", rebuild=True)
    assert copy.state()[2] == 0
    assert oct((tmp_path / "data.mdb").stat().st_mode & 0o777) == "0o600"
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"


def test_kill_9_during_a_full_load_leaves_the_previous_copy(tmp_path: Path) -> None:
    _fill(tmp_path, 100, b"before", revision=3)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from edge.store.localcopy import CopyWriter, LocalCopy
        copy = LocalCopy(Path({str(tmp_path)!r}), "file:/s")
        writer = CopyWriter(copy)
        writer.begin_full()
        for batch in range(300):
            writer.apply([(f"domains/n{{batch * 100 + i}}.test", b"after" * 200) for i in range(100)], 0)
            if batch == 50:
                writer.flush()
                print("writing", flush=True)
        writer.end_full(4)
        writer.flush()
        print("done", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline() == b"writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    copy = LocalCopy(tmp_path, "file:/s", rebuild=True)
    assert copy.state()[:1] == (3,) and dict(copy.items("domains/")) == {f"domains/n{i}.test": b"before"
                                                                         for i in range(100)}
    copy.close()
    # And killed after the commit: the whole new state.
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert child.stdout is not None
    while child.stdout.readline() not in (b"done\n", b""):
        time.sleep(0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    copy = LocalCopy(tmp_path, "file:/s", rebuild=True)
    assert copy.state()[0] == 4 and copy.state()[2] == 30_000
