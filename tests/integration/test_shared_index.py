"""workers = 2 with the host's shared index (issue #13): after a restart the
second worker holds no index of its own and reads the one the first worker
writes; a change made through the CLI is served by both within 100 ms."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography import x509

from tests.integration.conftest import EdgeProcess, wait_for
from tests.integration.test_import_and_scale import _many


def _serial(node: EdgeProcess, name: str) -> int | None:
    der = node.handshake_or_empty(name)
    return x509.load_der_x509_certificate(der).serial_number if der else None


def test_two_workers_share_one_index_and_see_a_change_within_100_ms(tmp_path: Path, backend: str) -> None:
    node = EdgeProcess(tmp_path / "node", extra_config="[tls]\ncontext_cache_size = 1\n")
    node.config.write_text(node.config.read_text().replace('admin = ""', 'admin = ""\nworkers = 2'))
    first = tmp_path / "first"
    first.mkdir()
    serials = _many(first, 50)
    node.cli("apps-add", "demo", "--backend", backend)
    node.cli("certs-import", "--app", "demo", str(first))
    node.start()
    wait_for(lambda: b"store loaded" in bytes(node.log), timeout=20)
    node.stop()
    node.log = bytearray()
    node.start()  # the copy now holds the index: the second worker reads it
    try:
        wait_for(lambda: b"worker reads the shared index" in bytes(node.log), timeout=10)
        for name in sorted(serials)[:20]:  # connections spread over both workers
            assert _serial(node, name) == serials[name], bytes(node.log).decode()[-3000:]
        second = tmp_path / "second"
        second.mkdir()
        fresh = _many(second, 50)
        name = sorted(fresh)[3]
        for path in second.iterdir():
            if path.stem != name:
                path.unlink()
        node.cli("certs-import", "--app", "demo", str(second))
        returned = time.monotonic()
        wait_for(lambda: _serial(node, name) == fresh[name], timeout=5, interval=0.002)
        # Twenty new connections in a row (SO_REUSEPORT spreads them) all get the new one.
        while True:
            seen = [_serial(node, name) for _ in range(20)]
            if all(s == fresh[name] for s in seen):
                break
            assert time.monotonic() - returned < 5, seen
            start_again = time.monotonic()
        took = (locals().get("start_again", time.monotonic()) - returned)
        print(f"both workers serve the change {1000 * took:.0f} ms after the command returned")
        assert took < 0.1
    finally:
        node.stop()
