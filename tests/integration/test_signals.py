"""SIGHUP re-reads configuration and store; a broken configuration is refused."""

from __future__ import annotations

import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme

from tests import pki
from tests.integration.conftest import EdgeProcess, free_port, wait_for


@pytest.fixture
def hup_edge(tmp_path: Path, backend: str, ca: trustme.CA):
    process = EdgeProcess(tmp_path / "edge")
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    yield process
    process.stop()


def _hup(edge: EdgeProcess) -> None:
    assert edge.proc is not None
    edge.proc.send_signal(signal.SIGHUP)


def test_sighup_applies_a_good_config(hup_edge: EdgeProcess, ca: trustme.CA, tmp_path: Path) -> None:
    new_platform = pki.issue(ca, "*.edge.test", "edge.test")
    (tmp_path / "p.crt").write_bytes(new_platform.cert)
    (tmp_path / "p.key").write_bytes(new_platform.key)
    text = hup_edge.config.read_text()
    text = text.replace('cert = "dev/platform.crt"', f'cert = "{tmp_path / "p.crt"}"')
    text = text.replace('key = "dev/platform.key"', f'key = "{tmp_path / "p.key"}"\nstrict_sni = true')
    hup_edge.config.write_text(text)
    _hup(hup_edge)
    wait_for(lambda: b"configuration reloaded" in hup_edge.log)
    assert hup_edge.handshake("demo.edge.test") == new_platform.leaf_der  # new platform certificate, live
    with pytest.raises((ssl.SSLError, ConnectionError)):
        hup_edge.handshake("unknown.example.org")  # strict_sni now on


def test_sighup_refuses_a_broken_config_and_keeps_serving(hup_edge: EdgeProcess) -> None:
    before = hup_edge.handshake("demo.edge.test")
    hup_edge.config.write_text(hup_edge.config.read_text().replace("[proxy]", "[proxy]\nidle_timeout = -5"))
    _hup(hup_edge)
    wait_for(lambda: b"configuration refused, the running one is kept" in hup_edge.log)
    assert b"idle_timeout: must be a positive number" in hup_edge.log
    assert hup_edge.handshake("demo.edge.test") == before
    result = hup_edge.curl(f"https://demo.edge.test:{hup_edge.https_port}/", "-k", "-o", "/dev/null",
                           "-w", "%{http_code}")
    assert result.stdout == "200"
    assert hup_edge.proc is not None and hup_edge.proc.poll() is None


def test_sighup_refuses_a_broken_certificate(hup_edge: EdgeProcess, tmp_path: Path) -> None:
    before = hup_edge.handshake("demo.edge.test")
    (tmp_path / "bad.crt").write_text("not a certificate")
    hup_edge.config.write_text(hup_edge.config.read_text().replace(
        'cert = "dev/platform.crt"', f'cert = "{tmp_path / "bad.crt"}"'))
    _hup(hup_edge)
    wait_for(lambda: b"configuration refused" in hup_edge.log)
    time.sleep(0.1)
    assert hup_edge.handshake("demo.edge.test") == before
    with socket.create_connection(("127.0.0.1", hup_edge.https_port), timeout=2):
        pass


def test_json_log_file_reopened_on_sigusr1(tmp_path: Path, backend: str) -> None:
    import json

    log_file = tmp_path / "edge.log"
    process = EdgeProcess(tmp_path / "edge")
    process.config.write_text(process.config.read_text().replace(
        'level = "debug"', f'level = "info"\nformat = "json"\naccess_log = true\nfile = "{log_file}"'))
    # The log goes to the file, so wait for the port rather than the log line.
    assert process.proc is None
    import subprocess

    from tests.integration.conftest import EDGE

    https_port = free_port()
    process.config.write_text(process.config.read_text().replace('https = ["127.0.0.1:0"]',
                                                                 f'https = ["127.0.0.1:{https_port}"]'))
    process.https_port = https_port
    process.proc = subprocess.Popen([EDGE, "serve", "--config", str(process.config)])
    try:
        wait_for(lambda: log_file.exists() and b"edge serving https" in log_file.read_bytes())
        first = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert all({"time", "level", "logger", "message"} <= set(entry) for entry in first)
        log_file.rename(tmp_path / "edge.log.1")  # what logrotate does
        process.proc.send_signal(signal.SIGUSR1)
        process.cli("apps-add", "demo", "--backend", backend)
        process.wait_routed("demo.edge.test")
        wait_for(lambda: process.curl(f"https://demo.edge.test:{https_port}/", "-k", "-o", "/dev/null",
                                      "-w", "%{http_code}").stdout == "200")
        wait_for(lambda: log_file.exists() and b'"host":"demo.edge.test"' in log_file.read_bytes())
        access = [json.loads(line) for line in log_file.read_text().splitlines() if '"host"' in line]
        assert access[0]["status"] == 200
        assert b"PRIVATE KEY" not in log_file.read_bytes() + (tmp_path / "edge.log.1").read_bytes()
    finally:
        process.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_cleanly_and_at_once(tmp_path: Path, backend: str, workers: int) -> None:
    """A shutdown that raised (a reader without __len__ after a merge) left the
    process running until the harness killed it, 10 s later, in every test."""
    process = EdgeProcess(tmp_path / "edge")
    process.config.write_text(process.config.read_text().replace('admin = ""', f'admin = ""\nworkers = {workers}'))
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    assert process.status("demo.edge.test") == 200
    assert process.proc is not None
    started = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(timeout=8) == 0, bytes(process.log).decode()[-2000:]
    assert time.monotonic() - started < 5
    assert b"Traceback" not in bytes(process.log), bytes(process.log).decode()[-2000:]
