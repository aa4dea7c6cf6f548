"""The per-request controls of issue #14 over HTTP/2 (curl --http2 and
python-hyper's h2): HSTS, maintenance, error pages, 429, per-app series,
and the client a PROXY header names reaching the backend. The HTTP/1.1
side is test_app_controls; both go through one core (edge.proxy.decide and
edge.proxy.controls)."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from edge.tls import proxyproto
from tests.integration.conftest import EdgeProcess, free_port, require_tool, wait_for
from tests.integration.test_app_controls import ctl_edge, own_hsts_backend, scrape, value  # noqa: F401 - fixtures
from tests.integration.test_client_identity import pp_edge  # noqa: F401 - the fixture, reused

HOST = "demo.edge.test"


def curl2(edge: EdgeProcess, host: str, path: str = "/") -> tuple[int, dict[str, str], str]:
    """(status, fields, body) as curl got them over HTTP/2 (asserted)."""
    require_tool("curl")
    result = edge.curl(f"https://{host}:{edge.https_port}{path}", "--http2", "--cacert", str(edge.dev_ca),
                       "-D", "-", "-w", "\n%{http_version}")
    out, version = result.stdout.rsplit("\n", 1)
    assert version == "2", result.stderr
    head, _, body = out.partition("\n\n")  # text mode: curl's CRLFs read as LF
    lines = head.split("\n")
    fields = {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), fields, body


def test_hsts_over_http2(ctl_edge: EdgeProcess, backend: str, own_hsts_backend: str) -> None:  # noqa: F811
    ctl_edge.cli("apps-add", "demo", "--backend", backend, "--no-force-https", "--hsts", "86400", "--hsts-preload")
    wait_for(lambda: "strict-transport-security" in curl2(ctl_edge, HOST)[1], timeout=2)
    assert curl2(ctl_edge, HOST)[1]["strict-transport-security"] == "max-age=86400; preload"
    ctl_edge.cli("apps-add", "own", "--backend", own_hsts_backend, "--hsts", "600")
    ctl_edge.wait_routed("own.edge.test")
    assert curl2(ctl_edge, "own.edge.test")[1]["strict-transport-security"] == "max-age=5"
    ctl_edge.cli("apps-add", "demo", "--backend", backend, "--no-force-https", "--no-hsts")
    wait_for(lambda: "strict-transport-security" not in curl2(ctl_edge, HOST)[1], timeout=2)


def test_maintenance_and_error_pages_over_http2(ctl_edge: EdgeProcess, backend: str, tmp_path: Path) -> None:  # noqa: F811
    ctl_edge.cli("apps-add", "demo", "--backend", backend, "--no-force-https", "--maintenance")
    wait_for(lambda: curl2(ctl_edge, HOST)[0] == 503, timeout=2)
    _status, fields, body = curl2(ctl_edge, HOST)
    assert "maintenance" in body and fields["retry-after"] == "30"
    page = tmp_path / "503.html"
    page.write_text("<h1>h2 — custom 503</h1>", encoding="utf-8")
    ctl_edge.cli("apps-error-page", "demo", str(page), "--status", "503")
    wait_for(lambda: curl2(ctl_edge, HOST)[2] == page.read_text(encoding="utf-8"), timeout=2)
    ctl_edge.cli("apps-error-page", "demo", "--status", "503", "--remove")
    ctl_edge.cli("apps-add", "demo", "--backend", backend, "--no-force-https", "--no-maintenance")
    wait_for(lambda: curl2(ctl_edge, HOST)[0] == 200, timeout=2)
    ctl_edge.cli("apps-add", "gone", "--backend", f"127.0.0.1:{free_port()}", "--no-force-https")
    ctl_edge.wait_routed("gone.edge.test")
    bad = tmp_path / "502.html"
    bad.write_text("<h1>h2 custom 502</h1>", encoding="utf-8")
    ctl_edge.cli("apps-error-page", "gone", str(bad), "--status", "502")
    wait_for(lambda: curl2(ctl_edge, "gone.edge.test")[2] == "<h1>h2 custom 502</h1>", timeout=2)


def test_per_app_series_count_http2(ctl_edge: EdgeProcess) -> None:  # noqa: F811
    series = 'edge_app_requests_total{app="demo",code="2xx"}'
    before = value(scrape(ctl_edge), series)
    for _ in range(3):
        assert curl2(ctl_edge, HOST, "/m2")[0] == 200
    assert value(scrape(ctl_edge), series) - before == 3


@pytest.fixture(scope="module")
def rate_edge2(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("edge-rate2"),
                          "[limits]\nrequests_per_ip_per_second = 1\nburst = 3\n")
    process.start()
    process.cli("apps-add", "demo", "--backend", backend, "--no-force-https")
    process.wait_routed(HOST)
    yield process
    process.stop()


def h2_session(edge: EdgeProcess, header: bytes = b"",
               source: str = "127.0.0.1") -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    ctx = ssl.create_default_context(cafile=str(edge.dev_ca))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", edge.https_port), timeout=10, source_address=(source, 0))
    raw.sendall(header)
    sock = ctx.wrap_socket(raw, server_hostname=HOST)
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def h2_get(sock: ssl.SSLSocket, conn: h2.connection.H2Connection, sid: int) -> tuple[int, dict, bytes]:
    conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":authority", HOST), (":path", "/h2")],
                      end_stream=True)
    sock.sendall(conn.data_to_send())
    status, fields, body, done = 0, {}, b"", False
    while not done:
        data = sock.recv(65536)
        assert data, "closed"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                fields = {k.decode(): v.decode() for k, v in event.headers}
                status = int(fields[":status"])
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                done = True
        sock.sendall(conn.data_to_send())
    return status, fields, body


def test_429_over_one_http2_connection(rate_edge2: EdgeProcess) -> None:
    sock, conn = h2_session(rate_edge2, source="127.0.0.4")
    try:
        answers = [h2_get(sock, conn, 2 * n + 1) for n in range(6)]
    finally:
        sock.close()
    statuses = [a[0] for a in answers]
    assert statuses[:3] == [200] * 3 and 429 in statuses, statuses
    assert next(a for a in answers if a[0] == 429)[1]["retry-after"] == "1"
    other, conn2 = h2_session(rate_edge2, source="127.0.0.5")
    try:
        assert h2_get(other, conn2, 1)[0] == 200
    finally:
        other.close()


def test_proxy_header_client_reaches_the_backend_over_http2(pp_edge: EdgeProcess) -> None:  # noqa: F811
    sock, conn = h2_session(pp_edge, proxyproto.v2(("198.51.100.77", 4242)))
    try:
        status, _, body = h2_get(sock, conn, 1)
    finally:
        sock.close()
    assert status == 200
    assert dict(json.loads(body)["headers"])["x-forwarded-for"] == "198.51.100.77"


def test_untrusted_forwarded_for_replaced_over_http2(ctl_edge: EdgeProcess) -> None:  # noqa: F811
    sock, conn = h2_session(ctl_edge)
    try:
        conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", HOST), (":path", "/x"),
                              ("x-forwarded-for", "6.6.6.6"), ("x-real-ip", "6.6.6.6")], end_stream=True)
        sock.sendall(conn.data_to_send())
        body = b""
        while True:
            data = sock.recv(65536)
            events = conn.receive_data(data)
            body += b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
            if any(isinstance(e, h2.events.StreamEnded) for e in events):
                break
    finally:
        sock.close()
    headers = dict(json.loads(body)["headers"])
    assert headers["x-forwarded-for"] == "127.0.0.1" and "x-real-ip" not in headers


