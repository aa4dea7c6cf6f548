"""An upgrade that refuses no connection (issue #13): the new edge binds the
running one's ports (``edge serve --takeover``, SO_REUSEPORT), then the old
one stops accepting and drains; a client sending requests all along sees
every one answered, but for what Linux resets without net.ipv4.tcp_migrate_req."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from tests.integration.conftest import EDGE, EdgeProcess, free_port, wait_for

HANDSHAKE_RESET = "reset before the TLS handshake ended"


def _request(port: int) -> int | str:
    """One request on a new connection: the status, or what went wrong."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError as exc:
        return f"connect: {exc!r}"
    with raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="demo.edge.test")
        except ConnectionResetError:
            return HANDSHAKE_RESET
        except (OSError, ssl.SSLError) as exc:
            return f"handshake: {exc!r}"
        try:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n")
            head = tls.recv(64)
        except (OSError, ssl.SSLError) as exc:
            return f"request: {exc!r}"
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else f"answer: {head!r}"


def _node(root: Path, https: int, http: int, admin: int) -> EdgeProcess:
    node = EdgeProcess(root)
    text = node.config.read_text().replace('https = ["127.0.0.1:0"]', f'https = ["127.0.0.1:{https}"]')
    text = text.replace('http = ["127.0.0.1:0"]', f'http = ["127.0.0.1:{http}"]')
    node.config.write_text(text.replace('admin = ""', f'admin = "127.0.0.1:{admin}"'))
    return node


def test_takeover_then_drain_refuses_no_connection(tmp_path: Path, backend: str) -> None:
    ports = free_port(), free_port(), free_port()
    old = _node(tmp_path / "old", *ports)
    old.cli("apps-add", "demo", "--backend", backend)
    old.start()
    new = _node(tmp_path / "new", *ports)
    new.config.write_text(new.config.read_text().replace('path = "store"', f'path = "{tmp_path / "old" / "store"}"'))
    results: list[int | str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            results.append(_request(ports[0]))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(0.5)
        new.start("--takeover")
        time.sleep(0.5)
        assert old.proc is not None
        old.stop()  # SIGTERM: stop accepting, drain, exit
        time.sleep(1.0)
        wait_for(lambda: results[-1] == 200)
    finally:
        stop.set()
        thread.join()
        new.stop()
        old.stop()
    failed = [r for r in results if r != 200]
    print(f"{len(results)} requests across the upgrade, {len(failed)} failed: {failed[:5]}")
    assert len(results) > 50
    assert b"serving" in bytes(new.log)
    # Without the sysctl, Linux resets the connections still queued on the old
    # process's listener when it closes it (they were never accepted, so no
    # process can answer them); with it, they move to the successor's listener.
    # benchmarks/upgrade.py measures both: 0 with the sysctl, 9-44 without under
    # load. The successor warns when it is off. Every other failure is a defect.
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
    assert (b"tcp_migrate_req is" in bytes(new.log)) == (migrate != "1"), migrate
    if migrate == "1":
        assert failed == []
    else:
        assert all(r == HANDSHAKE_RESET for r in failed) and len(failed) <= len(results) // 100, failed


def test_without_takeover_a_held_port_is_refused(tmp_path: Path, backend: str) -> None:
    ports = free_port(), free_port(), free_port()
    old = _node(tmp_path / "old", *ports)
    old.start()
    try:
        second = _node(tmp_path / "second", *ports)
        second.config.write_text(second.config.read_text().replace(f'"127.0.0.1:{ports[2]}"', '""'))
        result = subprocess.run([EDGE, "serve", "--config", str(second.config)], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].endswith("Address already in use")
    finally:
        old.stop()
