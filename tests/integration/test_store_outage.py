"""Serving never depends on the store being reachable (issue #18).

200 custom domains, a context cache of one so no name stays warm: every
handshake builds its context from the bundle. While etcd is killed (-9) and
restarted, and while a file store's directory is gone for a moment, each
handshake still gets its own certificate, never the default one; a node
started while etcd is down, or while the file store's directory is gone,
serves its previous names from the host's local copy and says so on
/healthz and in a metric. App routes too: a backend change made just before
etcd dies is what requests reach during the outage.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.conftest import EchoHandler, EdgeProcess, free_port, wait_for
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


def _metric(node: EdgeProcess, name: str) -> float:
    with urllib.request.urlopen(node.admin + "/metrics", timeout=10) as response:  # type: ignore[attr-defined]
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def _reload_and_wait(node: EdgeProcess, line: bytes) -> None:
    """SIGHUP (a full reload of the store), then wait for its outcome in the log."""
    before = bytes(node.log).count(line)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: bytes(node.log).count(line) > before, timeout=15)


def test_file_store_gone_for_a_moment_changes_nothing_served(tmp_path: Path, backend: str) -> None:
    """The store's directory moved away while serving, and a full reload made
    meanwhile (the risk: an empty listing read as "every name deleted")."""
    node = _node(tmp_path / "node", None)
    serials = _populate(node, tmp_path, backend)
    node.start()
    try:
        rng = random.Random(13)
        wait_for(lambda: b"store loaded" in bytes(node.log), timeout=20)
        store = node.root / "store"
        store.rename(node.root / "store.away")  # every read fails: as a directory made unreadable
        try:
            _reload_and_wait(node, b"store reload failed")  # deterministic: a reload sees the store gone
            away = _hammer(node, serials, 2.0, rng)
            health = _healthz(node)
            assert health["status"] == "ok" and health["store"] == "stale copy", health
            assert _metric(node, "edge_store_stale_seconds") > 0
        finally:
            (node.root / "store.away").rename(store)
        print(f"store away: {away[0]} handshakes, {away[1]} wrong, {away[2]} failed")
        assert away[0] > 20 and away[1:] == (0, 0)
        _reload_and_wait(node, b"store reloaded")
        assert _healthz(node)["stale_since"] is None
        assert _hammer(node, serials, 1.0, rng)[1:] == (0, 0)
    finally:
        node.stop()


def test_node_started_while_the_file_store_is_gone_serves_its_copy(tmp_path: Path, backend: str) -> None:
    node = _node(tmp_path / "node", None)
    serials = _populate(node, tmp_path, backend)
    node.start()
    try:
        wait_for(lambda: b"store loaded" in bytes(node.log), timeout=20)
        node.stop()
        store = node.root / "store"
        store.rename(node.root / "store.away")
        store.write_text("not a directory\n")  # replaced by a file (chmod 000 does not stop root)
        node.log = bytearray()
        node.start()
        health = _healthz(node)
        assert health["status"] == "ok" and health["store"] == "stale copy" and health["stale_since"], health
        assert _metric(node, "edge_store_stale_seconds") > 0
        cold = _hammer(node, serials, 2.0, random.Random(7))
        print(f"started with the store gone: {cold[0]} handshakes, {cold[1]} wrong, {cold[2]} failed")
        assert cold[0] > 20 and cold[1:] == (0, 0)
        store.unlink()
        (node.root / "store.away").rename(store)
        wait_for(lambda: _healthz(node)["stale_since"] is None, timeout=30)  # caught up once it is back
        assert _hammer(node, serials, 1.0, random.Random(8))[1:] == (0, 0)
    finally:
        node.stop()


@pytest.fixture
def second_backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _backend_of(node: EdgeProcess, host: str) -> int | None:
    """The port of the backend a request for ``host`` reached (None: no backend answered)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", node.https_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    except (OSError, ssl.SSLError):
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    return int(json.loads(body)["backend"])


def test_etcd_outage_serves_an_app_route_changed_just_before(tmp_path: Path, etcd: Etcd, backend: str,
                                                              second_backend: int) -> None:
    node = _node(tmp_path / "node", etcd)
    serials = _populate(node, tmp_path, backend)
    names = sorted(serials)
    node.start()
    try:
        wait_for(lambda: b"store loaded" in bytes(node.log), timeout=20)
        node.cli("apps-add", "demo", "--backend", f"127.0.0.1:{second_backend}")  # only the route changes
        wait_for(lambda: _backend_of(node, names[0]) == second_backend)
        etcd.stop()  # kill -9, right after the change
        rng = random.Random(5)
        reached = [_backend_of(node, rng.choice(names)) for _ in range(40)]
        assert reached == [second_backend] * 40, reached
        node.stop()  # and a node started during the outage routes as the copy says
        node.log = bytearray()
        node.start()
        assert _healthz(node)["store"] == "stale copy"
        reached = [_backend_of(node, rng.choice(names)) for _ in range(40)]
        assert reached == [second_backend] * 40, reached
        etcd.start()
        wait_for(lambda: _healthz(node)["stale_since"] is None, timeout=20)
    finally:
        node.stop()
