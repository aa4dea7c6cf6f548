"""The host's local copy: full loads in pages that never tear a name, damaged and foreign files rebuilt."""

from __future__ import annotations

import json
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

from edge.records import decode_name_record
from edge.store.copywriter import CopyWriter
from edge.store.localcopy import LocalCopy


def _domain(app: str, pad: int = 0) -> bytes:
    return json.dumps({"app": app, "pad": "x" * pad}).encode()


def _fill(path: Path, count: int, app: str = "before", revision: int = 7, pad: int = 0) -> None:
    copy = LocalCopy(path, "file:/s", rebuild=True)
    writer = CopyWriter(copy)
    writer.begin_full(first=True)
    writer.load([(f"domains/n{i}.test", _domain(app, pad)) for i in range(count)])
    writer.end_full(revision)
    writer.close()
    copy.close()


def _apps(copy: LocalCopy) -> dict[str, str | None]:
    return {domain: decode_name_record(domain, raw)[0] for domain, raw in copy.records()}


def test_a_full_load_removes_what_it_did_not_see_and_keeps_a_damaged_entrys_last_version(tmp_path: Path) -> None:
    _fill(tmp_path, 10)
    copy = LocalCopy(tmp_path, "file:/s")
    writer = CopyWriter(copy)
    writer.begin_full(first=False)
    writer.load([("domains/n1.test", _domain("after"))])
    writer.flush()
    assert copy.get("domains/n1.test") == _domain("after")  # pages are served as they commit
    assert copy.state().revision == 7  # but the revision waits for the end: a restart resumes from there
    writer.load([("domains/new.test", _domain("x")), ("domains/n2.test", b"{damaged")])
    writer.end_full(9)
    writer.flush()
    assert _apps(copy) == {"n1.test": "after", "n2.test": "before", "new.test": "x"}
    assert copy.state().revision == 9 and copy.state().complete
    assert "domains/n2.test" in writer.errors
    writer.close()


def test_a_watched_change_during_a_full_load_wins_over_an_older_page(tmp_path: Path) -> None:
    _fill(tmp_path, 3)
    copy = LocalCopy(tmp_path, "file:/s")
    writer = CopyWriter(copy)
    writer.begin_full(first=False)
    writer.apply([("domains/n0.test", _domain("new")), ("domains/n1.test", None)], 8)
    writer.load([("domains/n0.test", _domain("old")), ("domains/n1.test", _domain("old")),
                 ("domains/n2.test", _domain("old"))])  # read by the snapshot before the changes
    writer.end_full(9)
    writer.flush()
    assert _apps(copy) == {"n0.test": "new", "n2.test": "old"}
    writer.close()


def test_a_first_load_empties_an_incomplete_copy_and_marks_it_complete_at_its_end(tmp_path: Path) -> None:
    copy = LocalCopy(tmp_path, "file:/s", rebuild=True)
    writer = CopyWriter(copy)
    writer.begin_full(first=True)
    writer.load([("domains/stale.test", _domain("a"))])
    writer.flush()
    assert not copy.state().complete
    writer.begin_full(first=True)  # a restart before it ended
    writer.load([("domains/fresh.test", _domain("a"))])
    writer.end_full(1)
    writer.flush()
    assert _apps(copy) == {"fresh.test": "a"} and copy.state().complete
    writer.close()


def test_truncated_file_is_rebuilt_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fill(tmp_path, 2000, pad=2000)
    data = tmp_path / "data.mdb"
    os.truncate(data, data.stat().st_blocks * 512 // 2)  # half of what it holds (the file is sparse)
    with pytest.raises(lmdb.Error):
        LocalCopy(tmp_path, "file:/s")  # a reader never reads past the end (SIGBUS)
    with caplog.at_level(logging.ERROR):
        copy = LocalCopy(tmp_path, "file:/s", rebuild=True)
    assert copy.state().entries == 0 and not copy.state().complete
    assert [r.message for r in caplog.records if "truncated" in r.message] != []
    assert len(caplog.records) == 1


@pytest.mark.parametrize("damage", ["garbage", "foreign"])
def test_foreign_or_garbage_file_is_rebuilt(tmp_path: Path, damage: str) -> None:
    _fill(tmp_path, 5)
    if damage == "garbage":
        (tmp_path / "data.mdb").write_bytes(b"not lmdb" * 4096)
        (tmp_path / "lock.mdb").unlink()
    copy = LocalCopy(tmp_path, "file:/s" if damage == "garbage" else "etcd:other/", rebuild=True)
    assert copy.state().entries == 0
    assert oct((tmp_path / "data.mdb").stat().st_mode & 0o777) == "0o600"
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"


def test_kill_9_during_a_full_load_leaves_every_name_before_or_after(tmp_path: Path) -> None:
    _fill(tmp_path, 100, "before", revision=3)
    script = textwrap.dedent(f"""
        import json, time
        from pathlib import Path
        from edge.store.copywriter import CopyWriter
        from edge.store.localcopy import LocalCopy
        copy = LocalCopy(Path({str(tmp_path)!r}), "file:/s")
        writer = CopyWriter(copy)
        writer.begin_full(first=False)
        for page in range(300):
            value = json.dumps({{"app": "after", "pad": "y" * 900}}).encode()
            writer.load([(f"domains/n{{page * 100 + i}}.test", value) for i in range(100)])
            if page == 50:
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
    state = copy.state()
    assert state.revision == 3 and state.complete  # resumed from where the last complete state was
    apps = _apps(copy)
    for i in range(100):  # each name's record matches its entry: before or after, never torn
        entry = json.loads(copy.get(f"domains/n{i}.test") or b"{}")["app"]
        assert apps[f"n{i}.test"] == entry and entry in ("before", "after")
    copy.close()
    # And killed after the end: the whole new state.
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert child.stdout is not None
    while child.stdout.readline() not in (b"done\n", b""):
        time.sleep(0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    copy = LocalCopy(tmp_path, "file:/s", rebuild=True)
    assert copy.state().revision == 4 and copy.state().entries == 30_000
    assert set(_apps(copy).values()) == {"after"}
