"""Per-request controls on a real edge (issue #14): HSTS, maintenance, error
pages, per-app series, requests per address (429). HTTP/1.1 here; HTTP/2 in
test_app_controls_h2 once the HTTP/2 core is in."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.conftest import EdgeProcess, free_port, wait_for

TOKEN = "t0ken"


class OwnHstsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Strict-Transport-Security", "max-age=5")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def own_hsts_backend() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OwnHstsHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def ctl_edge(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("edge-ctl"))
    port = free_port()
    process.config.write_text(process.config.read_text().replace(
        'admin = ""', f'admin = "127.0.0.1:{port}"\nadmin_token = "{TOKEN}"'))
    process.admin = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    process.start()
    process.cli("apps-add", "demo", "--backend", backend, "--no-force-https")
    process.wait_routed("demo.edge.test")
    yield process
    process.stop()


def https(edge: EdgeProcess, host: str, path: str = "/", source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=5, source_address=(source, 0)) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return parse(data)


def http(edge: EdgeProcess, host: str, path: str = "/") -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", edge.http_port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return parse(data)


def parse(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), fields, body


def test_hsts_on_https_only_and_never_over_the_backends(ctl_edge: EdgeProcess, backend: str,
                                                        own_hsts_backend: str) -> None:
    assert "strict-transport-security" not in https(ctl_edge, "demo.edge.test")[1]
    ctl_edge.cli("apps-add", "demo", "--backend", backend, "--no-force-https", "--hsts", "31536000",
                 "--hsts-subdomains")
    wait_for(lambda: "strict-transport-security" in https(ctl_edge, "demo.edge.test")[1], timeout=2)
    status, fields, _ = https(ctl_edge, "demo.edge.test")
    assert status == 200 and fields["strict-transport-security"] == ["max-age=31536000; includeSubDomains"]
    assert "strict-transport-security" not in http(ctl_edge, "demo.edge.test")[1]  # RFC 6797 §7.2
    # The backend's own field wins, and is not doubled.
    ctl_edge.cli("apps-add", "own", "--backend", own_hsts_backend, "--hsts", "600")
    ctl_edge.wait_routed("own.edge.test")
    assert https(ctl_edge, "own.edge.test")[1]["strict-transport-security"] == ["max-age=5"]
    ctl_edge.cli("apps-add", "demo", "--backend", backend, "--no-force-https", "--no-hsts")
    wait_for(lambda: "strict-transport-security" not in https(ctl_edge, "demo.edge.test")[1], timeout=2)


def test_maintenance_while_a_client_loop_runs(ctl_edge: EdgeProcess, backend: str) -> None:
    statuses: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                statuses.append(https(ctl_edge, "demo.edge.test", "/loop")[0])
            except (OSError, ssl.SSLError) as exc:
                failures.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        wait_for(lambda: len(statuses) > 5)
        ctl_edge.cli("apps-add", "demo", "--backend", backend, "--no-force-https", "--maintenance")
        wait_for(lambda: statuses[-1] == 503, timeout=2)
        status, fields, body = https(ctl_edge, "demo.edge.test")
        assert status == 503 and b"maintenance" in body and fields["retry-after"] == ["30"]
        ctl_edge.cli("apps-add", "demo", "--backend", backend, "--no-force-https", "--no-maintenance")
        wait_for(lambda: statuses[-1] == 200, timeout=2)
    finally:
        stop.set()
        thread.join()
    assert not failures and set(statuses) == {200, 503}, (failures[:3], set(statuses))


def test_custom_error_pages(ctl_edge: EdgeProcess, tmp_path: Path) -> None:
    page = tmp_path / "503.html"
    page.write_text("<h1>Nous revenons vite — custom 503</h1>", encoding="utf-8")
    ctl_edge.cli("apps-add", "dead", "--backend", f"127.0.0.1:{free_port()}", "--no-force-https")
    ctl_edge.wait_routed("dead.edge.test")
    status, _, body = https(ctl_edge, "dead.edge.test")
    assert status == 502 and b"<p>edge</p>" in body
    bad = tmp_path / "502.html"
    bad.write_text("<h1>custom 502</h1>", encoding="utf-8")
    ctl_edge.cli("apps-error-page", "dead", str(bad), "--status", "502")
    wait_for(lambda: https(ctl_edge, "dead.edge.test")[2] == b"<h1>custom 502</h1>", timeout=2)
    ctl_edge.cli("apps-error-page", "dead", str(page), "--status", "503")
    ctl_edge.cli("apps-add", "dead", "--backend", f"127.0.0.1:{free_port()}", "--no-force-https", "--maintenance")
    wait_for(lambda: https(ctl_edge, "dead.edge.test")[0] == 503, timeout=2)
    status, fields, body = https(ctl_edge, "dead.edge.test")
    assert body == page.read_bytes() and fields["content-type"] == ["text/html; charset=utf-8"]
    assert fields["content-length"] == [str(len(page.read_bytes()))]
    # ACME HTTP-01 challenges are still answered in maintenance (404 here: no token), not 503.
    assert http(ctl_edge, "dead.edge.test", "/.well-known/acme-challenge/x")[0] == 404


def scrape(edge: EdgeProcess) -> str:
    request = urllib.request.Request(edge.admin + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})  # type: ignore[attr-defined]
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()


def value(text: str, series: str) -> float:
    match = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_per_app_series_scraped(ctl_edge: EdgeProcess) -> None:
    before = scrape(ctl_edge)
    for _ in range(3):
        assert https(ctl_edge, "demo.edge.test", "/m")[0] == 200
    after = scrape(ctl_edge)
    series = 'edge_app_requests_total{app="demo",code="2xx"}'
    assert value(after, series) - value(before, series) == 3
    assert value(after, 'edge_app_request_duration_seconds_count{app="demo"}') >= 3
    assert value(after, 'edge_app_upstream_errors_total{app="dead",reason="refused"}') >= 1
    assert 'edge_connections_refused_total{reason="connections_per_ip"} 0.0' in after


@pytest.fixture(scope="module")
def rate_edge(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("edge-rate"),
                          "[limits]\nrequests_per_ip_per_second = 2\nburst = 5\n[metrics]\nper_app = false\n")
    process.start()
    process.cli("apps-add", "demo", "--backend", backend, "--no-force-https")
    wait_for(lambda: https(process, "demo.edge.test", source="127.0.0.9")[0] == 200)
    yield process
    process.stop()


def test_429_under_a_burst_from_one_address_only(rate_edge: EdgeProcess) -> None:
    statuses = [https(rate_edge, "demo.edge.test", source="127.0.0.2") for _ in range(12)]
    codes = [s[0] for s in statuses]
    assert codes[:5] == [200] * 5 and codes.count(429) >= 5, codes
    limited = next(s for s in statuses if s[0] == 429)
    assert 1 <= int(limited[1]["retry-after"][0]) <= 1
    assert https(rate_edge, "demo.edge.test", source="127.0.0.3")[0] == 200  # another address: unaffected
