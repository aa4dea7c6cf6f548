"""The host's local copy of the index (issue #13): crash safety and damage.

A kill -9 of edge (one process; or the supervisor and its workers, the
first of which writes the copy) during a bulk import, then a restart: the
copy's entries and every name's record equal the store, every name
compared, and the names are served. A truncated copy is rebuilt at start
with one log line, and serving goes on from the store.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from edge.records import decode_name_record
from edge.store.base import Event, EventKind
from edge.store.index import Index
from edge.store.localcopy import LocalCopy
from tests.integration.conftest import EDGE, EdgeProcess, wait_for
from tests.integration.test_import_and_scale import _many


def _store_entries(root: Path) -> dict[str, bytes]:
    """Every served entry of a file store, by key (``apps/x``, ``domains/x``, ``certs/k/x``)."""
    out = {}
    for top, suffix in (("apps", ".json"), ("domains", ".json"), ("certs", ".pem")):
        for path in (root / top).rglob("*" + suffix):
            if path.name.startswith("."):
                continue
            out[str(path.relative_to(root))[: -len(suffix)]] = path.read_bytes()
    return out


def _records_from(entries: dict[str, bytes]) -> dict[str, tuple[str | None, tuple]]:
    """What every name's record must say, derived from the store's entries."""
    index = Index()
    for key, value in entries.items():
        index.apply(Event(EventKind.PUT, key, value, 0))
    return {d: (index.domains.get(d), tuple(index.certs.get(d, ()))) for d in index.domains.keys() | index.certs.keys()}


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_during_an_import_then_restart_index_equals_store(tmp_path: Path, backend: str, workers: int) -> None:
    node = EdgeProcess(tmp_path / "node", extra_config="[tls]\ncontext_cache_size = 10\n")
    node.config.write_text(node.config.read_text().replace('admin = ""', f'admin = ""\nworkers = {workers}'))
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    serials = _many(bundles, 3000)
    node.cli("apps-add", "demo", "--backend", backend)
    node.start()
    assert node.proc is not None
    wait_for(lambda: b"store loaded" in bytes(node.log), timeout=30)  # the copy is complete: the writer follows
    importer = subprocess.Popen([EDGE, "--config", str(node.config), "certs-import", "--app", "demo", str(bundles)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Edge is applying (and copying) the import's changes: some names are served already.
    wait_for(lambda: any(node.handshake_or_empty(n) for n in sorted(serials)[:50]), timeout=60, interval=0.05)
    assert importer.poll() is None, "the import ended before the kill"
    workers_pids = [int(p) for p in re.findall(rb"worker \d+ \(pid (\d+)\) starting", bytes(node.log))]
    os.kill(node.proc.pid, signal.SIGKILL)  # the supervisor first: it would restart a worker
    for pid in workers_pids:  # the first writes the copy
        os.kill(pid, signal.SIGKILL)
    node.proc.wait()
    importer.wait(120)
    node.log = bytearray()
    node.start()
    wait_for(lambda: b"store reloaded" in bytes(node.log), timeout=60)  # caught up from the store
    node.stop()  # the copy's writer finishes its queue before exit
    copy = LocalCopy(node.root / "index", f"file:{(node.root / 'store').resolve()}")
    copy_entries = dict(copy.items())
    records = {domain: decode_name_record(domain, raw) for domain, raw in copy.records()}
    copy.close()
    store_entries = _store_entries(node.root / "store")
    assert len(store_entries) == 1 + 2 * 3000
    assert copy_entries == store_entries
    expected = _records_from(store_entries)
    assert len(expected) == 3000
    assert {d: (app, tuple(held)) for d, (app, held) in records.items()} == expected  # every name compared
    node.log = bytearray()
    node.start()
    try:
        for name in random.Random(5).sample(sorted(serials), 200):
            assert x509.load_der_x509_certificate(node.handshake(name)).serial_number == serials[name]
    finally:
        node.stop()


def test_truncated_copy_is_rebuilt_at_start(tmp_path: Path, backend: str) -> None:
    node = EdgeProcess(tmp_path / "node")
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    serials = _many(bundles, 300)
    node.cli("apps-add", "demo", "--backend", backend)
    node.cli("certs-import", "--app", "demo", str(bundles))
    node.start()
    wait_for(lambda: b"store loaded" in bytes(node.log), timeout=20)
    node.stop()
    data = node.root / "index" / "data.mdb"
    os.truncate(data, data.stat().st_blocks * 512 // 3)  # a third of what it holds (the file is sparse)
    node.log = bytearray()
    node.start()
    try:
        assert bytes(node.log).count(b"is truncated: removed, it is rebuilt from the store") == 1
        name = sorted(serials)[7]
        assert x509.load_der_x509_certificate(node.handshake(name)).serial_number == serials[name]
        wait_for(lambda: b"store loaded: 1 apps, 300 domains" in bytes(node.log), timeout=20)
    finally:
        node.stop()
