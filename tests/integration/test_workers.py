"""workers = 2: shared ports, TLS resumption across workers, a killed worker replaced."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.integration.conftest import EdgeProcess, wait_for


def worker_pids(edge: EdgeProcess) -> set[int]:
    return {int(p) for p in re.findall(r"worker \d+ \(pid (\d+)\) starting", bytes(edge.log).decode())}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, backend: str):
    process = EdgeProcess(tmp_path_factory.mktemp("workers"))
    process.config.write_text(process.config.read_text().replace('admin = ""', 'admin = ""\nworkers = 2'))
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    wait_for(lambda: len(worker_pids(process)) == 2)
    yield process
    process.stop()


def _connect(edge: EdgeProcess, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", edge.https_port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="demo.edge.test", session=session)


def test_sessions_resume_across_workers(two_workers: EdgeProcess) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # session from the handshake itself, no ticket race
    with _connect(two_workers, ctx, None) as first:
        first.sendall(b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n")
        while first.recv(65536):
            pass
        session = first.session
    resumed = 0
    attempts = 40
    for _ in range(attempts):
        with _connect(two_workers, ctx, session) as tls:
            resumed += tls.session_reused
            tls.sendall(b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
    # SO_REUSEPORT spreads 40 connections over both workers; with per-worker
    # ticket keys about half would fail to resume.
    assert resumed >= attempts * 0.9, f"only {resumed}/{attempts} resumed"


def test_killed_worker_is_replaced(two_workers: EdgeProcess) -> None:
    before = worker_pids(two_workers)
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(worker_pids(two_workers) - before) == 1, timeout=10)
    replacement = (worker_pids(two_workers) - before).pop()
    assert alive(replacement) and not alive(victim)
    # Service continues on the shared port.
    for _ in range(10):
        result = two_workers.curl(f"https://demo.edge.test:{two_workers.https_port}/", "-k", "-o", "/dev/null",
                                  "-w", "%{http_code}")
        assert result.stdout == "200"


def test_both_workers_follow_the_store(two_workers: EdgeProcess, backend: str) -> None:
    two_workers.cli("apps-add", "second", "--backend", backend)
    two_workers.wait_routed("second.edge.test")
    ok = 0
    for _ in range(20):
        result = two_workers.curl(f"https://second.edge.test:{two_workers.https_port}/", "-k", "-o", "/dev/null",
                                  "-w", "%{http_code}")
        ok += result.stdout == "200"
        time.sleep(0.01)
    assert ok == 20


def test_metrics_sum_over_workers(tmp_path_factory: pytest.TempPathFactory, backend: str) -> None:
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        admin_port = s.getsockname()[1]
    process = EdgeProcess(tmp_path_factory.mktemp("workers-metrics"))
    process.config.write_text(process.config.read_text().replace(
        'admin = ""', f'admin = "127.0.0.1:{admin_port}"\nworkers = 2'))
    process.start()
    try:
        process.cli("apps-add", "demo", "--backend", backend)
        process.wait_routed("demo.edge.test")
        wait_for(lambda: len(worker_pids(process)) == 2)
        for _ in range(40):  # SO_REUSEPORT spreads these over both workers
            result = process.curl(f"https://demo.edge.test:{process.https_port}/", "-k", "-o", "/dev/null",
                                  "-w", "%{http_code}")
            assert result.stdout == "200"

        def summed() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as response:
                text = response.read().decode()
            ok = next(float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith('edge_requests_total{code="2xx"}'))
            workers = next(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith("edge_workers_reporting"))
            return ok >= 40 and workers == 2

        wait_for(summed, timeout=5)
    finally:
        process.stop()
