"""The benchmark suite runs every scenario (in a tiny mode) and writes its
outputs. No speed is judged here: that is what the suite itself reports."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.certs import bench_certificates
from benchmarks.systems import BENCH_HOST, Backend, StackCeiling, StackPool, StackRelay, System
from tests.integration.conftest import require_tool

ROOT = Path(__file__).parents[1]


def test_suite_runs_every_scenario_and_writes_results(tmp_path: Path) -> None:
    for tool in ("nginx", "haproxy", "wrk", "h2load", "taskset"):
        require_tool(tool)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, "stderr:\n" + result.stderr[-4000:] + "\nstdout:\n" + result.stdout[-1500:]
    data = json.loads((tmp_path / "latest.json").read_text())
    scenarios = data["scenarios"]
    assert set(scenarios) == {"handshakes-ecdsa", "handshakes-rsa", "resumed", "keepalive-small", "keepalive-64k",
                              "h2-small", "page-load", "many-names", "update-latency", "idle-memory",
                              "idle-memory-h2"}
    for name in ("handshakes-ecdsa", "handshakes-rsa", "resumed", "keepalive-small", "keepalive-64k", "h2-small"):
        for system in ("edge", "nginx", "haproxy"):
            figures = scenarios[name][system]
            assert figures["per_cpu_s"] > 0 and figures["errors"] == 0, (name, system, figures)
    assert scenarios["resumed"]["edge"]["resumed_share"] > 0.9
    assert scenarios["idle-memory"]["edge"]["connections"] == 50
    assert scenarios["idle-memory-h2"]["edge"]["connections"] == 50
    for system in ("edge", "nginx", "haproxy"):  # a few pages: too little CPU to rate in tiny mode
        page = scenarios["page-load"][system]
        assert page["requests"] == page["pages"] * 40 and page["errors"] == 0, (system, page)
    assert scenarios["update-latency"]["edge"]["updates"] == 3
    assert scenarios["update-latency"]["edge, 2 nodes on etcd"]["updates"] == 3  # scripts/provision.sh installs etcd
    assert scenarios["many-names"]["edge@100"]["loaded_s"] >= scenarios["many-names"]["edge@100"]["start_s"]
    assert "error" not in scenarios["many-names"]["edge@100"]
    markdown = (tmp_path / "latest.md").read_text()
    assert "| scenario | edge | nginx | haproxy | edge/nginx | edge/haproxy |" in markdown
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_index_rows_run_on_both_stores(tmp_path: Path) -> None:
    """benchmarks.shared_index (issue #13's rows) in tiny mode: every row
    measured, the restart with the copy on disk, etcd's database sized."""
    for tool in ("nginx", "etcd", "taskset"):
        require_tool(tool)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.shared_index", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, "stderr:\n" + result.stderr[-4000:] + "\nstdout:\n" + result.stdout[-3000:]
    (report,) = tmp_path.glob("*-shared-index-0k.json")
    data = json.loads(report.read_text())
    rows = {(row["store"], row["workers"]): row for row in data["rows"]}
    assert set(rows) == {(s, w) for s in ("file", "etcd") for w in ("1", "2", "auto")}
    for (_store, workers), row in rows.items():
        assert row["processes"] == (1 if workers == "1" else 3), row  # auto: both cores, so 2 workers
        assert row["first_s"] <= row["loaded_s"] <= row["copy_written_s"], row
        assert row["restart_first_s"] > 0 and row["restart_first_s"] <= row["restart_loaded_s"], row
        assert row["pss_loaded_mib"] == pytest.approx(sum(row["pss_loaded_each_mib"]))
        assert row["cold_errors"] == 0 and row["cold_per_cpu_s"] > 0, row
    sizes = data["etcd"]
    assert sizes["entries"] == 201 and sizes["db_loaded_mib"] >= sizes["db_empty_mib"] > 0
    assert set(sizes["per_name_by_bundle_size"]) == {"1000", "2000", "3000", "4000", "6000"}
    assert "| etcd | 2 | 3 |" in (tmp_path / report.name.replace(".json", ".md")).read_text()


def _exchange(tls: ssl.SSLSocket, path: str, close: bool = False) -> bytes:
    """One request; the whole response (by its Content-Length, or to the close)."""
    connection = "Connection: close\r\n" if close else ""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {BENCH_HOST}\r\n{connection}\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or (not close and len(data) < _framed_length(data)):
        chunk = tls.recv(65536)
        if not chunk:
            return data
        data += chunk
    while close and (chunk := tls.recv(65536)):
        data += chunk
    return data


def _framed_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    fields = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in fields if line.startswith(b"content-length:"))
    return len(head) + 4 + length


def _backend_connections(peer: System, backend_port: int) -> set[int]:
    """The local ports of ``peer``'s established TCP connections to the backend, from ``ss``."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", "dst", f"127.0.0.1:{backend_port}"],
                         capture_output=True, text=True, check=True).stdout
    assert peer.proc is not None
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if f"pid={peer.proc.pid}," in line}


def _one_connection(peer: System, ctx: ssl.SSLContext) -> None:
    """A TLS connection through ``peer``: two keep-alive requests, then a last
    one with ``Connection: close`` that ``peer`` answers and closes."""
    with socket.create_connection(("127.0.0.1", peer.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=BENCH_HOST) as tls:
        first = _exchange(tls, "/small")
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\nhello, world\n"), first
        if peer.name == "uvloop-tls":
            assert b"Server:" not in first
        else:
            assert b"Server: nginx" in first  # the backend's own answer, relayed
            big = _exchange(tls, "/64k")  # same connection, same backend connection
            assert big.endswith(b"\r\n\r\n" + b"x" * 65536) and b"Connection: keep-alive" in big
        last = _exchange(tls, "/small", close=True)  # returns once the proxy closed
        assert last.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in last, last
        assert last.endswith(b"hello, world\n")


def test_stack_ceilings_answer_and_relay_over_real_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop-tls answers by itself. uvloop-relay hands requests verbatim to
    the benchmark backend over a connection of its own, keeps it for keep-alive
    requests and closes the client when the backend closes after ``Connection:
    close``. uvloop-pool does the same over pooled backend connections: the
    second client reuses the first one's."""
    for tool in ("nginx", "taskset", "ss"):
        require_tool(tool)
    monkeypatch.chdir(ROOT)  # the peers run ``python -m benchmarks.stack_ceiling``
    certs = bench_certificates()
    backend = Backend("backend", tmp_path, 0, certs)
    backend.start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs.ca)
    try:
        for peer in (StackCeiling("uvloop-tls", tmp_path, backend.port, certs),
                     StackRelay("uvloop-relay", tmp_path, backend.port, certs, key_type="rsa"),
                     StackPool("uvloop-pool", tmp_path, backend.port, certs)):
            peer.start()
            try:
                _one_connection(peer, ctx)
                pooled = _backend_connections(peer, backend.port)
                _one_connection(peer, ctx)
                if peer.name == "uvloop-pool":
                    assert len(pooled) == 1 and _backend_connections(peer, backend.port) == pooled
                else:  # the backend closed each one after Connection: close
                    assert not pooled
            finally:
                peer.stop()
            assert peer.version.startswith(peer.name + ": benchmarks/stack_ceiling.py")
    finally:
        backend.stop()


# Five systems started in turn: ~40 s on a quiet machine, over the default 120 s under load.
@pytest.mark.timeout(400)
def test_suite_runs_the_ceilings_beside_the_proxies(tmp_path: Path) -> None:
    """The load generators' response checks pass through the ceilings, and the
    report rates them against nginx and splits CPU into user and kernel time."""
    for tool in ("nginx", "wrk", "h2load", "taskset"):
        require_tool(tool)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--tiny", "--out", str(tmp_path), "--scenarios",
         "handshakes-ecdsa,keepalive-small", "--peers", "edge,nginx,uvloop-tls,uvloop-relay,uvloop-pool"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, "stderr:\n" + result.stderr[-4000:] + "\nstdout:\n" + result.stdout[-1500:]
    data = json.loads((tmp_path / "latest.json").read_text())
    for scenario in ("handshakes-ecdsa", "keepalive-small"):
        for system in ("edge", "nginx", "uvloop-tls", "uvloop-relay", "uvloop-pool"):
            figures = data["scenarios"][scenario][system]
            assert figures["per_cpu_s"] > 0 and figures["errors"] == 0, (scenario, system, figures)
            assert figures["proxy_user_s"] + figures["proxy_sys_s"] == pytest.approx(figures["proxy_cpu_s"])
    assert data["versions"]["uvloop-relay"].startswith("uvloop-relay: benchmarks/stack_ceiling.py --backend")
    markdown = (tmp_path / "latest.md").read_text()
    assert ("| edge/nginx | edge/uvloop-tls | edge/uvloop-relay | edge/uvloop-pool | uvloop-tls/nginx "
            "| uvloop-relay/nginx | uvloop-pool/nginx |" in markdown), markdown
    split = markdown.split("| scenario | system | user | kernel | total | kernel share |")[1]
    assert "| handshakes-ecdsa | uvloop-relay |" in split and "| keepalive-small | uvloop-relay |" in split
