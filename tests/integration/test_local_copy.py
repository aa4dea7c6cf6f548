"""The host's local copy of the index (issue #13): crash safety and damage.

A kill -9 of edge during a bulk import, then a restart: the copy and the
served names equal the store, every name compared. A truncated copy is
rebuilt at start with one log line, and serving goes on from the store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from cryptography import x509

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


def test_kill_9_during_an_import_then_restart_index_equals_store(tmp_path: Path, backend: str) -> None:
    node = EdgeProcess(tmp_path / "node", extra_config="[tls]\ncontext_cache_size = 10\n")
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    serials = _many(bundles, 3000)
    node.cli("apps-add", "demo", "--backend", backend)
    node.start()
    assert node.proc is not None
    importer = subprocess.Popen([EDGE, "--config", str(node.config), "certs-import", "--app", "demo", str(bundles)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # edge is applying (and copying) the import's changes
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait()
    importer.wait(120)
    node.log = bytearray()
    node.start()
    wait_for(lambda: b"store reloaded" in bytes(node.log), timeout=60)  # caught up from the store
    node.stop()  # the copy's writer finishes its queue before exit
    copy = LocalCopy(node.root / "index", f"file:{(node.root / 'store').resolve()}")
    copy_entries = dict(copy.items())
    copy.close()
    store_entries = _store_entries(node.root / "store")
    assert len(store_entries) == 1 + 2 * 3000
    assert copy_entries == store_entries
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
