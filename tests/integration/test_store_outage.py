"""Serving never depends on the store being reachable (issue #18).

200 custom domains, a context cache of one so no name stays warm: every
handshake builds its context from the bundle. While etcd is killed (-9) and
restarted, and while a file store's directory is gone for a moment, each
handshake still gets its own certificate, never the default one; a node
started while etcd is down serves its previous names from the host's local
copy and says so on /healthz.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from pathlib import Path

from cryptography import x509

from tests.integration.conftest import EdgeProcess, free_port, wait_for
from tests.integration.etcd_server import Etcd, etcd_node
from tests.integration.test_import_and_scale import _many

COUNT = 200


def _node(root: Path, etcd: Etcd | None) -> EdgeProcess:
    node = etcd_node(root, etcd) if etcd is not None else EdgeProcess(root)
    admin = free_port()
    text = node.config.read_text().replace('admin = ""', f'admin = "127.0.0.1:{admin}"')
    node.config.write_text(text + "[tls]\ncontext_cache_size = 1\n")
    node.admin = f"http://127.0.0.1:{admin}"  # type: ignore[attr-defined]
    return node


def _healthz(node: EdgeProcess) -> dict:
    with urllib.request.urlopen(node.admin + "/healthz", timeout=10) as response:  # type: ignore[attr-defined]
        return json.loads(response.read())


def _populate(node: EdgeProcess, tmp_path: Path, backend: str) -> dict[str, int]:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    serials = _many(bundles, COUNT)
    node.cli("apps-add", "demo", "--backend", backend)
    node.cli("certs-import", "--app", "demo", str(bundles))
    return serials


def _serial(node: EdgeProcess, name: str) -> int | None:
    """The serial number served for ``name``; None when the handshake failed."""
    der = node.handshake_or_empty(name)
    return x509.load_der_x509_certificate(der).serial_number if der else None


def _hammer(node: EdgeProcess, serials: dict[str, int], seconds: float, rng: random.Random) -> tuple[int, int, int]:
    """(handshakes, wrong certificates, failed handshakes) for random names over ``seconds``."""
    names = sorted(serials)
    done = wrong = failed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        name = rng.choice(names)
        got = _serial(node, name)
        done += 1
        failed += got is None
        wrong += got is not None and got != serials[name]
    return done, wrong, failed


def _update(node: EdgeProcess, tmp_path: Path, serials: dict[str, int], names: list[str]) -> None:
    """Replace the certificates of ``names`` (new serials) and wait until they are served."""
    again = tmp_path / "again"
    again.mkdir()
    fresh = _many(again, COUNT)  # same names, new serials, another CA
    for path in again.iterdir():
        if path.stem not in names:
            path.unlink()
    node.cli("certs-import", "--app", "demo", str(again))
    for name in names:
        serials[name] = fresh[name]
        wait_for(lambda name=name: _serial(node, name) == serials[name])


def test_etcd_outage_changes_nothing_served(tmp_path: Path, etcd: Etcd, backend: str) -> None:
    node = _node(tmp_path / "node", etcd)
    serials = _populate(node, tmp_path, backend)
    node.start()
    try:
        rng = random.Random(18)
        wait_for(lambda: b"store loaded" in bytes(node.log), timeout=20)
        _update(node, tmp_path, serials, sorted(serials)[:5])  # just before the outage
        etcd.stop()  # kill -9
        down = _hammer(node, serials, 5.0, rng)
        for name in sorted(serials)[:5]:
            assert _serial(node, name) == serials[name], "an update made before the outage is served"
        assert _healthz(node)["status"] == "ok"
        etcd.start()
        up = _hammer(node, serials, 1.0, rng)
        print(f"etcd down: {down[0]} handshakes, {down[1]} wrong, {down[2]} failed; "
              f"back up: {up[0]} handshakes, {up[1]} wrong, {up[2]} failed")
        assert down[0] > 50 and down[1:] == (0, 0) and up[1:] == (0, 0)
        # It follows the store again: a change made now is served.
        (tmp_path / "after").mkdir()
        _update(node, tmp_path / "after", serials, [sorted(serials)[10]])
        wait_for(lambda: _healthz(node)["stale_since"] is None, timeout=15)

        # A node started while etcd is down serves what it served before it stopped.
        node.stop()
        etcd.stop()
        node.log = bytearray()
        node.start()
        health = _healthz(node)
        assert health["status"] == "ok" and health["store"] == "stale copy" and health["stale_since"], health
        cold = _hammer(node, serials, 2.0, rng)
        print(f"started with etcd down: {cold[0]} handshakes, {cold[1]} wrong, {cold[2]} failed")
        assert cold[0] > 20 and cold[1:] == (0, 0)
        etcd.start()
        wait_for(lambda: _healthz(node)["stale_since"] is None, timeout=20)
    finally:
        node.stop()


def test_file_store_gone_for_a_moment_changes_nothing_served(tmp_path: Path, backend: str) -> None:
    node = _node(tmp_path / "node", None)
    serials = _populate(node, tmp_path, backend)
    node.start()
    try:
        rng = random.Random(13)
        wait_for(lambda: b"store loaded" in bytes(node.log), timeout=20)
        store = node.root / "store"
        store.rename(node.root / "store.away")  # every read fails: as a directory made unreadable
        try:
            away = _hammer(node, serials, 2.0, rng)
        finally:
            (node.root / "store.away").rename(store)
        print(f"store away: {away[0]} handshakes, {away[1]} wrong, {away[2]} failed")
        assert away[0] > 20 and away[1:] == (0, 0)
    finally:
        node.stop()
