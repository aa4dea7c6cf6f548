"""PROXY protocol v1/v2 on both listeners, trusted proxies, connection limits at accept (issue #14).

A real edge on real sockets. Headers are written by hand (edge.tls.proxyproto's
helpers write the bytes of doc/proxy-protocol.txt §2.1/§2.2) and by HAProxy
(``send-proxy-v2``). The client address a header carries must reach the
backend as X-Forwarded-For. 127.0.0.1 is the trusted proxy; a client bound
to 127.0.0.2 is not.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest

from edge.tls import proxyproto
from tests.integration.conftest import EdgeProcess, free_port, require_tool, wait_for

HOST = "demo.edge.test"


@pytest.fixture(scope="module")
def pp_edge(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("edge-pp"))
    text = process.config.read_text().replace(
        'admin = ""', 'admin = ""\nproxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32", "::1/128"]')
    process.config.write_text(text + "[limits]\nconnections_per_ip = 20\n")
    process.start()
    process.cli("apps-add", "demo", "--backend", backend, "--no-force-https")
    wait_for(lambda: plain_request(process, proxyproto.v2(("203.0.113.9", 1234))).startswith(b"HTTP/1.1 200"))
    yield process
    process.stop()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    return sock


def read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def plain_request(edge: EdgeProcess, header: bytes, source: str = "127.0.0.1", extra: str = "") -> bytes:
    """The answer, or b"" when edge closed (or reset) the connection."""
    try:
        with connect(edge.http_port, source) as sock:
            sock.sendall(header + f"GET /who HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: close\r\n\r\n".encode())
            return read_all(sock)
    except OSError:
        return b""


def tls_request(edge: EdgeProcess, header: bytes, source: str = "127.0.0.1") -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with connect(edge.https_port, source) as raw:
            raw.sendall(header)
            with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
                tls.sendall(f"GET /who HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                return read_all(tls)
    except (OSError, ssl.SSLError):
        return b""


def forwarded_for(answer: bytes) -> str | None:
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    headers = dict(json.loads(answer.split(b"\r\n\r\n", 1)[1])["headers"])
    return headers.get("x-forwarded-for")


def test_v1_and_v2_headers_name_the_client_on_both_listeners(pp_edge: EdgeProcess) -> None:
    v1 = proxyproto.v1(("198.51.100.1", 40000), ("127.0.0.1", 443))
    v2 = proxyproto.v2(("198.51.100.2", 40001))
    v2_6 = proxyproto.v2(("2001:db8::7", 40002), ("::1", 443))
    assert forwarded_for(plain_request(pp_edge, v1)) == "198.51.100.1"
    assert forwarded_for(plain_request(pp_edge, v2)) == "198.51.100.2"
    assert forwarded_for(plain_request(pp_edge, v2_6)) == "2001:db8::7"
    assert forwarded_for(tls_request(pp_edge, v1)) == "198.51.100.1"
    assert forwarded_for(tls_request(pp_edge, v2)) == "198.51.100.2"


def test_v2_local_is_accepted_as_the_proxy_itself(pp_edge: EdgeProcess) -> None:
    assert forwarded_for(plain_request(pp_edge, proxyproto.v2(None))) == "127.0.0.1"
    assert forwarded_for(tls_request(pp_edge, proxyproto.v2(None))) == "127.0.0.1"


@pytest.mark.parametrize("header", [
    b"",  # missing: the request itself comes first
    b"PROXY TCP4 1.2.3.4 nonsense 1 2\r\n",
    proxyproto.V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),
])
def test_missing_or_malformed_header_closes_the_connection(pp_edge: EdgeProcess, header: bytes) -> None:
    assert plain_request(pp_edge, header) == b""
    assert tls_request(pp_edge, header) == b""


def test_header_from_an_untrusted_source_is_refused(pp_edge: EdgeProcess) -> None:
    v2 = proxyproto.v2(("198.51.100.3", 1))
    assert plain_request(pp_edge, v2, source="127.0.0.2") == b""
    assert tls_request(pp_edge, v2, source="127.0.0.2") == b""


def test_slow_header_times_out(pp_edge: EdgeProcess) -> None:
    with connect(pp_edge.http_port) as sock:
        sock.sendall(b"PROXY TCP4 ")
        sock.settimeout(10)
        started = time.monotonic()
        assert read_all(sock) == b""
        assert 4 < time.monotonic() - started < 8  # the handshake timeout (5 s in tests)


def test_a_21st_connection_from_one_client_is_refused(pp_edge: EdgeProcess) -> None:
    header = proxyproto.v2(("192.0.2.21", 5555))
    held = []
    try:
        for _ in range(20):
            sock = connect(pp_edge.https_port)
            sock.sendall(header)
            held.append(sock)
        time.sleep(0.3)  # the 20 headers read
        assert tls_request(pp_edge, header) == b""  # the 21st, closed before TLS
        # Another client behind the same proxy is not affected.
        assert forwarded_for(tls_request(pp_edge, proxyproto.v2(("192.0.2.22", 1)))) == "192.0.2.22"
    finally:
        for sock in held:
            sock.close()
    # Their places free up when they close.
    wait_for(lambda: tls_request(pp_edge, header).startswith(b"HTTP/1.1 200"))


def test_haproxy_send_proxy_v2_in_front(pp_edge: EdgeProcess, tmp_path) -> None:
    haproxy = require_tool("haproxy")
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
global
    log stdout format raw local0 err
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
listen front
    bind 127.0.0.3:{port}
    server edge 127.0.0.1:{pp_edge.http_port} send-proxy-v2
""")
    proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def through() -> bytes:
            try:
                with socket.create_connection(("127.0.0.3", port), timeout=5, source_address=("127.0.0.5", 0)) as s:
                    s.sendall(f"GET /who HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
                    return read_all(s)
            except OSError:
                return b""
        answer = wait_for(lambda: through() or None)
        assert forwarded_for(answer) == "127.0.0.5"
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture(scope="module")
def xff_edge(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[EdgeProcess]:
    """No PROXY protocol; 127.0.0.1 is a trusted proxy, 127.0.0.2 a client like any other."""
    process = EdgeProcess(tmp_path_factory.mktemp("edge-xff"))
    text = process.config.read_text().replace('admin = ""', 'admin = ""\ntrusted_proxies = ["127.0.0.1/32"]')
    process.config.write_text(text)
    process.start()
    process.cli("apps-add", "demo", "--backend", backend, "--no-force-https")
    process.wait_routed(HOST)
    yield process
    process.stop()


CLAIMS = "X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"


def echoed(answer: bytes) -> dict[str, str]:
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return dict(json.loads(answer.split(b"\r\n\r\n", 1)[1])["headers"])


def test_forwarded_for_appended_from_a_trusted_proxy(xff_edge: EdgeProcess) -> None:
    headers = echoed(plain_request(xff_edge, b"", "127.0.0.1", CLAIMS))
    assert headers["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert headers["forwarded"] == "for=6.6.6.6" and headers["x-real-ip"] == "6.6.6.6"


def test_forwarded_for_replaced_from_an_untrusted_client(xff_edge: EdgeProcess) -> None:
    headers = echoed(plain_request(xff_edge, b"", "127.0.0.2", CLAIMS))
    assert headers["x-forwarded-for"] == "127.0.0.2"
    assert "forwarded" not in headers and "x-real-ip" not in headers


def test_forwarded_for_from_a_proxy_protocol_client_is_replaced(pp_edge: EdgeProcess) -> None:
    # The PROXY header names the client (198.51.100.4, not trusted): its own claims are not believed.
    answer = plain_request(pp_edge, proxyproto.v2(("198.51.100.4", 9)), extra=CLAIMS)
    assert echoed(answer)["x-forwarded-for"] == "198.51.100.4"


def test_edge_check_refuses_proxy_protocol_without_trusted_proxies(tmp_path) -> None:
    process = EdgeProcess(tmp_path / "e")
    process.config.write_text(process.config.read_text().replace('admin = ""', 'admin = ""\nproxy_protocol = true'))
    result = process.cli("check", check=False)
    assert result.returncode == 1 and "[server] trusted_proxies" in result.stderr


def test_max_connections_pauses_accept_until_one_closes(tmp_path, backend: str) -> None:
    process = EdgeProcess(tmp_path / "e", "[limits]\nmax_connections = 3\n")
    process.start()
    try:
        process.cli("apps-add", "demo", "--backend", backend, "--no-force-https")
        process.wait_routed(HOST)  # these connections close: the count is back to 0
        held = [connect(process.http_port) for _ in range(3)]
        for sock in held:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            assert sock.recv(12) == b"HTTP/1.1 200"
        fourth = connect(process.http_port)  # the kernel completes it; edge does not accept it yet
        fourth.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        fourth.settimeout(0.5)
        with pytest.raises(TimeoutError):
            fourth.recv(12)
        held.pop().close()
        fourth.settimeout(5)
        assert fourth.recv(12) == b"HTTP/1.1 200"  # accepted once one closed: paused, not refused
        for sock in [*held, fourth]:
            sock.close()
    finally:
        process.stop()


def test_trusted_proxies_are_exempt_from_per_address_limits(tmp_path, backend: str) -> None:
    """Without a PROXY header a trusted proxy speaks for many clients: not counted; others are."""
    process = EdgeProcess(tmp_path / "e", "[limits]\nconnections_per_ip = 2\n")
    process.config.write_text(process.config.read_text().replace(
        'admin = ""', 'admin = ""\ntrusted_proxies = ["127.0.0.1/32"]'))
    process.start()
    try:
        process.cli("apps-add", "demo", "--backend", backend, "--no-force-https")
        process.wait_routed(HOST)
        held = [connect(process.http_port, "127.0.0.1") for _ in range(5)]
        held += [connect(process.http_port, "127.0.0.2") for _ in range(2)]
        time.sleep(0.3)
        assert forwarded_for(plain_request(process, b"", "127.0.0.1")) == "127.0.0.1"  # the 6th: served
        assert plain_request(process, b"", "127.0.0.2") == b""  # the 3rd from an ordinary client: closed
        for sock in held:
            sock.close()
    finally:
        process.stop()
