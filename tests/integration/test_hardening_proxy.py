"""Issue #11, data path: each defect class probed end to end, a real edge
process between real TLS clients and real backends (some of them
deliberately broken, scripted byte by byte)."""

from __future__ import annotations

import json
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer

import pytest

from tests.integration.conftest import EchoHandler, EdgeProcess, wait_for
from tests.integration.test_data_path import read_response, tls_socket

Script = Callable[[socket.socket, bytes], bool]  # answers one request; False: close the connection


class RawBackend:
    """A backend that answers each request with the bytes a test scripted for
    its path, on keep-alive connections; it records every request head."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(256)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.heads: list[bytes] = []
        self.scripts: dict[str, Script] = {}
        self.connections = 0
        self.ended: list[float] = []  # when each connection was closed by edge
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._exchanges(sock)
        finally:
            self.ended.append(time.monotonic())
            sock.close()

    def _exchanges(self, sock: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            self.heads.append(head)
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            need = int(length.group(1)) if length else 0
            while len(buffer) < need:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
            buffer = buffer[need:]
            path = head.split(b" ")[1].decode()
            script = self.scripts.get(path.split("?")[0], _ok)
            try:
                if not script(sock, head):
                    return
            except OSError:
                return

    def close(self) -> None:
        self.server.close()


def _ok(sock: socket.socket, head: bytes) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine")
    return True


def send(data: bytes, *, close: bool = True) -> Script:
    def script(sock: socket.socket, head: bytes) -> bool:
        sock.sendall(data)
        return not close

    return script


@pytest.fixture(scope="module")
def raw() -> Iterator[RawBackend]:
    backend = RawBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hedge(tmp_path_factory: pytest.TempPathFactory, backend: str, raw: RawBackend) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("hardening"))
    process.config.write_text(process.config.read_text().replace(
        'level = "debug"', 'level = "info"\naccess_log = true'))
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.cli("apps-add", "raw", "--backend", raw.address)
    process.wait_routed("demo.edge.test")
    process.wait_routed("raw.edge.test")
    yield process
    process.stop()


def exchange(edge: EdgeProcess, request: bytes, host: str = "demo.edge.test", timeout: float = 5) -> bytes:
    """Everything edge answers to ``request`` until it closes the connection."""
    with tls_socket(edge, host) as sock:
        sock.settimeout(timeout)
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
    return answer


def echo_headers(answer: bytes) -> dict[str, list[str]]:
    body = answer.partition(b"\r\n\r\n")[2]
    headers: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        headers.setdefault(name, []).append(value)
    return headers


# --- 1. upgrades: h2c never, a 101 only when asked -----------------------------------------------


@pytest.mark.parametrize(
    "upgrade",
    ["h2c", "H2C", "websocket, h2c", "h2", "HTTP/2.0", "h2c, websocket"],
)
def test_h2c_upgrade_is_not_forwarded(hedge: EdgeProcess, raw: RawBackend, upgrade: str) -> None:
    # A backend that speaks h2c: it switches whenever asked (or even when not).
    raw.scripts["/h2c"] = send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                               b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", close=False)
    before = len(raw.heads)
    answer = exchange(hedge, (
        f"GET /h2c HTTP/1.1\r\nHost: raw.edge.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        f"Upgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n").encode(), "raw.edge.test")
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]
    assert b"101" not in answer.split(b"\r\n", 1)[0]
    forwarded = raw.heads[before].lower()
    assert b"upgrade" not in forwarded and b"http2-settings" not in forwarded, forwarded


def test_h2c_upgrade_answered_as_plain_request(hedge: EdgeProcess) -> None:
    answer = exchange(hedge, b"GET /plain HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                             b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    headers = echo_headers(answer)
    assert "upgrade" not in headers and "http2-settings" not in headers


@pytest.mark.parametrize("request_upgrade", [None, "websocket"])
def test_unsolicited_101_is_502(hedge: EdgeProcess, raw: RawBackend, request_upgrade: str | None) -> None:
    """A 101 to a request that asked for no upgrade, or for another protocol."""
    raw.scripts["/switch"] = send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
                                  close=False)
    extra = f"Connection: Upgrade\r\nUpgrade: {request_upgrade}\r\n" if request_upgrade else "Connection: close\r\n"
    answer = exchange(hedge, f"GET /switch HTTP/1.1\r\nHost: raw.edge.test\r\n{extra}\r\n".encode(), "raw.edge.test")
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:200]


@pytest.mark.parametrize(
    "framing", ["Content-Length: 5\r\n\r\nhello", "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]
)
def test_upgrade_request_with_body_is_answered(hedge: EdgeProcess, framing: str) -> None:
    started = time.monotonic()
    answer = exchange(hedge, ("POST /up HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: Upgrade\r\n"
                              f"Upgrade: websocket\r\n{framing}").encode())
    assert time.monotonic() - started < 4
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["body_length"] == 5


# --- 4. a response cut short reaches the client as an abort ------------------------------------


CUT = {
    "/cut-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1f4\r\n" + b"a" * 500 + b"\r\n",
    "/cut-mid-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + b"a" * 500,
    "/cut-length": b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + b"a" * 500,
}


def reset_after(data: bytes) -> Script:
    """Send ``data``, then reset the connection (RST, not a clean close)."""
    def script(sock: socket.socket, head: bytes) -> bool:
        sock.sendall(data)
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False

    return script


def test_close_delimited_body_ended_by_a_reset_is_an_abort(hedge: EdgeProcess, raw: RawBackend) -> None:
    raw.scripts["/reset"] = reset_after(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"r" * 500)
    result = hedge.curl(f"https://raw.edge.test:{hedge.https_port}/reset", "--cacert", str(hedge.dev_ca),
                        "-o", "/dev/null", "--http1.1")
    assert result.returncode == 18, (result.returncode, result.stderr)
    # Over HTTP/2 the stream is reset (RFC 9113 §8.1): curl's 92, "stream was not closed cleanly".
    result = hedge.curl(f"https://raw.edge.test:{hedge.https_port}/reset", "--cacert", str(hedge.dev_ca),
                        "-o", "/dev/null", "--http2")
    assert result.returncode == 92, (result.returncode, result.stderr)


@pytest.mark.parametrize("path", sorted(CUT))
def test_truncated_response_is_an_abort_for_curl(hedge: EdgeProcess, raw: RawBackend, path: str) -> None:
    raw.scripts[path] = send(CUT[path])
    result = hedge.curl(f"https://raw.edge.test:{hedge.https_port}{path}", "--cacert", str(hedge.dev_ca),
                        "-o", "/dev/null", "--http1.1")
    # 18: "transfer closed with outstanding read data remaining"
    assert result.returncode == 18, (result.returncode, result.stderr)
    result = hedge.curl(f"https://raw.edge.test:{hedge.https_port}{path}", "--cacert", str(hedge.dev_ca),
                        "-o", "/dev/null", "--http2")
    assert result.returncode == 92, (result.returncode, result.stderr)  # the stream is reset


@pytest.mark.parametrize("path", sorted(CUT))
def test_truncated_response_never_ends_a_message(hedge: EdgeProcess, raw: RawBackend, path: str) -> None:
    raw.scripts[path] = send(CUT[path])
    answer = exchange(hedge, f"GET {path} HTTP/1.1\r\nHost: raw.edge.test\r\n\r\n".encode(), "raw.edge.test")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert not answer.endswith(b"0\r\n\r\n"), answer[-40:]
    assert b"a" * 500 in answer


def test_truncated_for_http10_client_is_aborted(hedge: EdgeProcess, raw: RawBackend) -> None:
    """An HTTP/1.0 client reads a close-delimited body: a clean close would
    look complete, so edge aborts (no TLS close_notify, RFC 8446 §6.1)."""
    raw.scripts["/cut-chunked"] = send(CUT["/cut-chunked"])
    ctx = ssl.create_default_context(cafile=str(hedge.dev_ca))
    raw_sock = socket.create_connection(("127.0.0.1", hedge.https_port), timeout=5)
    with ctx.wrap_socket(raw_sock, server_hostname="raw.edge.test", suppress_ragged_eofs=False) as sock:
        sock.sendall(b"GET /cut-chunked HTTP/1.0\r\nHost: raw.edge.test\r\n\r\n")
        answer = b""
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # never a clean end of stream
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_close_delimited_response_completes_and_is_logged(hedge: EdgeProcess, raw: RawBackend) -> None:
    raw.scripts["/close-delimited"] = send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"z" * 3000)
    result = hedge.curl(f"https://raw.edge.test:{hedge.https_port}/close-delimited", "--cacert", str(hedge.dev_ca),
                        "-H", "X-Request-ID: close-delimited-1")
    assert result.returncode == 0 and result.stdout == "z" * 3000

    def logged() -> dict | None:
        for line in bytes(hedge.log).decode().splitlines():
            if '"request_id":"close-delimited-1"' in line:
                return json.loads(line[line.index("{"):])
        return None

    entry = wait_for(logged)
    assert entry["status"] == 200 and entry["bytes"] == 3000


# --- 5. one authority: absolute-form wins over Host ---------------------------------------------


def test_absolute_form_routes_and_forwards_one_authority(hedge: EdgeProcess) -> None:
    answer = exchange(hedge, b"GET https://demo.edge.test/x?y=1 HTTP/1.1\r\nHost: evil.example\r\n"
                             b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    echo = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert echo["path"] == "/x?y=1"
    assert echo_headers(answer)["host"] == ["demo.edge.test"]


def test_absolute_form_keeps_port(hedge: EdgeProcess) -> None:
    answer = exchange(hedge, b"GET http://DEMO.edge.test:8443/p HTTP/1.1\r\nHost: demo.edge.test\r\n"
                             b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert echo_headers(answer)["host"] == ["DEMO.edge.test:8443"]


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"https://raw.edge.test/", b"502"),  # another app on the same certificate: routed there, not to demo
        (b"https://www.example.org/", b"404"),  # routed by the target, not by Host (no such app)
        (b"https://user:pw@demo.edge.test/", b"400"),  # userinfo (RFC 9110 §4.2.4)
        (b"ftp://demo.edge.test/", b"400"),
        (b"https:///nohost", b"400"),
    ],
)
def test_absolute_form_variants(hedge: EdgeProcess, raw: RawBackend, target: bytes, status: bytes) -> None:
    raw.scripts["/"] = send(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", close=False)
    answer = exchange(hedge, b"GET " + target + b" HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n")
    assert answer.split(b" ", 2)[1] == status, answer[:200]


# --- 6. nothing past a response reaches the pool -------------------------------------------------


EXCESS = {
    "/excess": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
               b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!",
    "/excess-garbage": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE",
    "/no-content": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nEVIL!",
    "/not-modified": b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!",
}


@pytest.mark.parametrize("path", sorted(EXCESS))
def test_bytes_past_a_response_never_reach_the_next_request(hedge: EdgeProcess, raw: RawBackend, path: str) -> None:
    raw.scripts[path] = send(EXCESS[path], close=False)
    first = exchange(hedge, f"GET {path} HTTP/1.1\r\nHost: raw.edge.test\r\nConnection: close\r\n\r\n".encode(),
                     "raw.edge.test")
    assert first.split(b" ", 2)[1] in (b"200", b"204", b"304")
    for _ in range(3):
        answer = exchange(hedge, b"GET /next HTTP/1.1\r\nHost: raw.edge.test\r\nConnection: close\r\n\r\n",
                          "raw.edge.test")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"fine"), answer


def test_head_answer_with_a_body_is_not_pooled(hedge: EdgeProcess, raw: RawBackend) -> None:
    raw.scripts["/head"] = send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!", close=False)
    first = exchange(hedge, b"HEAD /head HTTP/1.1\r\nHost: raw.edge.test\r\nConnection: close\r\n\r\n",
                     "raw.edge.test")
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\n")
    for _ in range(3):
        answer = exchange(hedge, b"GET /next HTTP/1.1\r\nHost: raw.edge.test\r\nConnection: close\r\n\r\n",
                          "raw.edge.test")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"fine"), answer


def test_pipelining_client_never_gets_excess_as_its_response(hedge: EdgeProcess, raw: RawBackend) -> None:
    raw.scripts["/excess"] = send(EXCESS["/excess"], close=False)
    with tls_socket(hedge, "raw.edge.test") as sock:
        sock.sendall(b"GET /excess HTTP/1.1\r\nHost: raw.edge.test\r\n\r\n"
                     b"GET /next HTTP/1.1\r\nHost: raw.edge.test\r\n\r\n")
        buffer = bytearray()
        assert read_response(sock, buffer)[2] == b"ok"
        assert read_response(sock, buffer)[2] == b"fine"


def test_early_answer_mid_upload_is_not_pooled(hedge: EdgeProcess, raw: RawBackend) -> None:
    """The backend answers before the request body is all sent: that
    connection must not carry another request (the backend would read it as
    the rest of the body, RFC 9112 §9.3)."""
    after_answer: list[bytes] = []

    def early(sock: socket.socket, head: bytes) -> bool:
        sock.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        sock.settimeout(2)
        seen = b""
        try:
            while data := sock.recv(65536):
                seen += data
        except OSError:
            pass
        after_answer.append(seen)
        return False

    raw.scripts["/early"] = early
    with tls_socket(hedge, "raw.edge.test") as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: raw.edge.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n")
        status, _, _ = read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 413")
    answer = exchange(hedge, b"GET /next HTTP/1.1\r\nHost: raw.edge.test\r\nConnection: close\r\n\r\n",
                      "raw.edge.test")
    assert answer.endswith(b"fine")
    wait_for(lambda: after_answer)
    assert b"/next" not in after_answer[0], after_answer


def test_client_ending_mid_body_ends_the_backend_request(hedge: EdgeProcess, raw: RawBackend) -> None:
    """A plain-HTTP client half-closes after part of its body: edge must not
    leave the backend waiting for the rest (request-side truncation)."""
    hedge.cli("apps-add", "plainraw", "--backend", raw.address, "--no-force-https")
    hedge.wait_routed("plainraw.edge.test")
    with socket.create_connection(("127.0.0.1", hedge.http_port), timeout=5) as sock:
        sock.sendall(b"POST /partial HTTP/1.1\r\nHost: plainraw.edge.test\r\nContent-Length: 1000\r\n\r\n" + b"p" * 10)
        wait_for(lambda: any(b"/partial" in head for head in raw.heads))
        ended_before = len(raw.ended)
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        wait_for(lambda: len(raw.ended) > ended_before, timeout=5)
        assert max(raw.ended) - started < 2


# --- 18. Connection cannot remove what edge sets -----------------------------------------------


@pytest.mark.parametrize("named", ["host", "x-request-id", "x-forwarded-for", "x-forwarded-proto",
                                   "x-forwarded-port", "X-Request-Id, Host"])
def test_connection_header_cannot_remove_edge_fields(hedge: EdgeProcess, named: str) -> None:
    answer = exchange(hedge, (f"GET /c HTTP/1.1\r\nHost: demo.edge.test\r\nX-Request-ID: keep-me\r\n"
                              f"Connection: close, {named}, x-drop\r\nX-Drop: 1\r\n\r\n").encode())
    headers = echo_headers(answer)
    assert headers["host"] == ["demo.edge.test"]
    assert headers["x-request-id"] == ["keep-me"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-port"] == [str(hedge.https_port)]
    assert "x-drop" not in headers


# --- 15.8. round-robin around a down backend -------------------------------------------------


def test_round_robin_even_around_a_down_backend(hedge: EdgeProcess, backend: str) -> None:
    second = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    second.daemon_threads = True
    threading.Thread(target=second.serve_forever, daemon=True).start()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    down = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens: refused
    try:
        hedge.cli("apps-add", "rr", "--backend", backend, "--backend", down,
                  "--backend", f"127.0.0.1:{second.server_address[1]}")
        hedge.wait_routed("rr.edge.test")
        for _ in range(3):  # the down backend is found out (and marked) on its first turn
            exchange(hedge, b"GET / HTTP/1.1\r\nHost: rr.edge.test\r\nConnection: close\r\n\r\n", "rr.edge.test")
        counts: dict[int, int] = {}
        for _ in range(12):
            answer = exchange(hedge, b"GET / HTTP/1.1\r\nHost: rr.edge.test\r\nConnection: close\r\n\r\n",
                              "rr.edge.test")
            port = json.loads(answer.partition(b"\r\n\r\n")[2])["backend"]
            counts[port] = counts.get(port, 0) + 1
        assert sorted(counts.values()) == [6, 6], counts
    finally:
        second.shutdown()


# --- 10. request ids unique across workers ----------------------------------------------------


def test_request_ids_unique_across_workers(tmp_path_factory: pytest.TempPathFactory, backend: str) -> None:
    from tests.integration.test_workers import worker_pids

    process = EdgeProcess(tmp_path_factory.mktemp("ids"))
    process.config.write_text(process.config.read_text().replace('admin = ""', 'admin = ""\nworkers = 2'))
    process.start()
    try:
        process.cli("apps-add", "demo", "--backend", backend)
        process.wait_routed("demo.edge.test")
        wait_for(lambda: len(worker_pids(process)) == 2)
        ids = []
        for _ in range(40):  # new connections: SO_REUSEPORT spreads them over both workers
            answer = exchange(process, b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n")
            ids.append(echo_headers(answer)["x-request-id"][0])
    finally:
        process.stop()
    assert len(set(ids)) == len(ids), sorted(ids)
    assert len({i[:16] for i in ids}) == 2  # one prefix per worker, not the parent's


# --- 11. memory per stalled reader ----------------------------------------------------------


def stalled_readers_growth(edge: EdgeProcess, clients: int, size: int) -> int:
    """KiB of RSS edge grows by while ``clients`` TLS clients each ask for
    ``size`` bytes and read none of them."""
    from tests.integration.test_data_path import rss_kib

    assert edge.proc is not None
    ctx = ssl.create_default_context(cafile=str(edge.dev_ca))
    socks = []
    try:
        for _ in range(3):  # warm up: the first connections allocate what every one shares
            exchange(edge, b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n")
        before, _ = rss_kib(edge.proc.pid)
        for _ in range(clients):
            raw_sock = socket.socket()
            raw_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            raw_sock.settimeout(10)
            raw_sock.connect(("127.0.0.1", edge.https_port))
            sock = ctx.wrap_socket(raw_sock, server_hostname="demo.edge.test")
            sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: demo.edge.test\r\n\r\n".encode())
            socks.append(sock)
        # Let edge fill every buffer it is willing to fill.
        samples = []
        for _ in range(6):
            time.sleep(0.5)
            samples.append(rss_kib(edge.proc.pid)[0])
        return max(samples) - before
    finally:
        for sock in socks:
            sock.close()


def test_stalled_readers_hold_little_memory(tmp_path_factory: pytest.TempPathFactory, backend: str) -> None:
    process = EdgeProcess(tmp_path_factory.mktemp("stalled"))
    process.config.write_text(process.config.read_text().replace('level = "debug"', 'level = "info"'))
    process.start()
    try:
        process.cli("apps-add", "demo", "--backend", backend)
        process.wait_routed("demo.edge.test")
        grown = stalled_readers_growth(process, 100, 8 * 1024 * 1024)
    finally:
        process.stop()
    print(f"100 stalled readers of 8 MiB: edge RSS +{grown} KiB")
    assert grown < 64 * 1024, f"100 stalled readers cost {grown} KiB"


# --- 15.11. access log: user agent, referer, protocol; the combined format -------------------


def test_access_log_has_agent_referer_protocol(hedge: EdgeProcess) -> None:
    exchange(hedge, b"GET /ua?q=1 HTTP/1.1\r\nHost: demo.edge.test\r\nUser-Agent: probe/1.0\r\n"
                    b"Referer: https://ref.example/\r\nX-Request-ID: ua-1\r\nConnection: close\r\n\r\n")

    def logged() -> dict | None:
        for line in bytes(hedge.log).decode().splitlines():
            if '"request_id":"ua-1"' in line:
                return json.loads(line[line.index("{"):])
        return None

    entry = wait_for(logged)
    assert entry["user_agent"] == "probe/1.0" and entry["referer"] == "https://ref.example/"
    assert entry["protocol"] == "HTTP/1.1"


def test_access_log_combined_format(tmp_path_factory: pytest.TempPathFactory, backend: str) -> None:
    process = EdgeProcess(tmp_path_factory.mktemp("combined"))
    process.config.write_text(process.config.read_text().replace(
        'level = "debug"', 'level = "info"\naccess_log = true\naccess_format = "combined"'))
    process.start()
    try:
        process.cli("apps-add", "demo", "--backend", backend)
        process.wait_routed("demo.edge.test")
        exchange(process, b'GET /c?x="1" HTTP/1.1\r\nHost: demo.edge.test\r\nUser-Agent: probe "2"\r\n'
                          b"Connection: close\r\n\r\n")
        pattern = re.compile(r'^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
                             r'"GET /c\?x=\\x221\\x22 HTTP/1\.1" 200 \d+ "-" "probe \\x222\\x22"$')
        wait_for(lambda: any(pattern.match(line) for line in bytes(process.log).decode().splitlines()))
    finally:
        process.stop()


# --- 6. http_reuse = "safe" (an experiment behind a flag) -------------------------------------


def test_http_reuse_safe_first_request_gets_its_own_connection(
    tmp_path_factory: pytest.TempPathFactory, backend: str
) -> None:
    process = EdgeProcess(tmp_path_factory.mktemp("reuse-safe"))
    process.config.write_text(process.config.read_text().replace(
        "[proxy]\n", '[proxy]\nhttp_reuse = "safe"\n'))
    process.start()
    try:
        process.cli("apps-add", "demo", "--backend", backend)
        process.wait_routed("demo.edge.test")
        ports = []
        for _ in range(4):  # each a new client connection: each a new backend connection
            answer = exchange(process, b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n")
            ports.append(json.loads(answer.partition(b"\r\n\r\n")[2])["client_port"])
        with tls_socket(process) as sock:  # later requests of one connection may reuse
            buffer = bytearray()
            again = set()
            for _ in range(3):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\n\r\n")
                again.add(json.loads(read_response(sock, buffer)[2])["client_port"])
    finally:
        process.stop()
    assert len(set(ports)) == 4, ports
    assert len(again) == 1


def test_curl_h2c_upgrade_with_body_on_port_80(hedge: EdgeProcess, backend: str) -> None:
    """curl --http2 on http:// asks for h2c on its first request, a POST with
    its body included: answered over HTTP/1.1, the body forwarded whole."""
    hedge.cli("apps-add", "plaindemo", "--backend", backend, "--no-force-https")
    hedge.wait_routed("plaindemo.edge.test")
    result = hedge.curl(f"http://plaindemo.edge.test:{hedge.http_port}/h2c-post", "--http2", "-d", "x" * 1000,
                        "-w", "\n%{http_version}")
    body, _, version = result.stdout.rpartition("\n")
    assert result.returncode == 0 and version == "1.1", result
    echo = json.loads(body)
    assert echo["body_length"] == 1000
    assert not {"upgrade", "http2-settings"} & {name for name, _ in echo["headers"]}
