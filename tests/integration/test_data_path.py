"""SPEC §5 over real TLS sockets: framing, streaming with flat memory,
upgrades, smuggling refused, error answers and timeouts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from edge.store.base import challenge_key
from edge.store.file import FileStore
from tests.integration.conftest import EdgeProcess, wait_for

HOST = "demo.edge.test"


def tls_socket(edge: EdgeProcess, host: str = HOST) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(edge.dev_ca))
    raw = socket.create_connection(("127.0.0.1", edge.https_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=host)


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response (Content-Length or chunked) from ``sock``; leftovers stay in ``buffer``."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a full head: {bytes(buffer)!r}")
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    buffer[:] = rest
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    status = lines[0]
    if b"content-length" in headers:
        size = int(headers[b"content-length"])
        while len(buffer) < size:
            buffer += sock.recv(65536)
        body = bytes(buffer[:size])
        buffer[:] = buffer[size:]
        return status, headers, body
    if headers.get(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while True:
            while b"\r\n" not in buffer:
                buffer += sock.recv(65536)
            line, _, rest = bytes(buffer).partition(b"\r\n")
            size = int(line, 16)
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            body += rest[:size]
            buffer[:] = rest[size + 2 :]
            if size == 0:
                return status, headers, bytes(body)
    return status, headers, b""


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


# --- framing ---------------------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(edge: EdgeProcess) -> None:
    with tls_socket(edge) as sock:
        sock.sendall(b"".join(f"GET /p{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() for i in range(5)))
        buffer = bytearray()
        paths = [json.loads(read_response(sock, buffer)[2])["path"] for _ in range(5)]
    assert paths == [f"/p{i}" for i in range(5)]


def test_large_responses_and_the_next_one_on_a_keep_alive_connection(edge: EdgeProcess) -> None:
    """Large reads are written to TLS piece by piece (no joined copy); every byte
    arrives, in order, and the next response on the connection is framed right."""
    with tls_socket(edge) as sock:
        buffer = bytearray()
        for size in (70_000, 200_000, 100):
            sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            status, _, body = read_response(sock, buffer)
            assert status.startswith(b"HTTP/1.1 200 ") and body == b"x" * size
        sock.sendall(f"GET /after HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert json.loads(read_response(sock, buffer)[2])["path"] == "/after"
        assert not buffer


def test_http10_client_gets_close_delimited_body(edge: EdgeProcess) -> None:
    with tls_socket(edge) as sock:
        sock.sendall(f"GET /chunked HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert body == b"first,second,third"


def test_expect_100_continue(edge: EdgeProcess) -> None:
    body = os.urandom(200_000)
    with tls_socket(edge) as sock:
        sock.sendall(f"POST /e HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        sock.sendall(body)
        buffer = bytearray(interim.partition(b"\r\n\r\n")[2])
        status, _, answer = read_response(sock, buffer)
    assert status.startswith(b"HTTP/1.1 200")
    assert json.loads(answer)["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: demo.edge.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: demo.edge.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: demo.edge.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: demo.edge.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\nHost: demo.edge.test\n\n",
        b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nX-A: 1\r\n  folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nHost: other.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : demo.edge.test\r\n\r\n",
    ],
    ids=["cl-and-te", "differing-cl", "bad-chunk-size", "te-not-chunked-last", "bare-lf", "obs-fold",
         "two-hosts", "space-before-colon"],
)
def test_smuggling_refused(edge: EdgeProcess, request_bytes: bytes) -> None:
    with tls_socket(edge) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 Bad Request"), answer[:200]
    assert answer.count(b"HTTP/1.1") == 1  # nothing reached the backend, nothing smuggled


def test_error_answers(edge: EdgeProcess) -> None:
    cases = {
        b"GET / HTTP/1.1\r\nHost: nobody.example.org\r\n\r\n": b"404",
        b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: demo.edge.test\r\n\r\n": b"414",
        b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nX: " + b"h" * 70000 + b"\r\n\r\n": b"431",
        b"GET / HTTP/1.1\r\n\r\n": b"400",
    }
    for request_bytes, status in cases.items():
        with tls_socket(edge) as sock:
            sock.sendall(request_bytes)
            answer = sock.recv(65536)
        assert answer.split(b" ")[1] == status, answer[:100]
        assert b"text/html" in answer


def test_app_without_backends_gets_503(edge: EdgeProcess) -> None:
    store = FileStore(edge.root / "store")
    asyncio.run(store.put("apps/empty", b'{"backends": []}'))
    wait_for(lambda: b"503" in edge.curl(f"https://empty.edge.test:{edge.https_port}/", "-k",
                                        "-o", "/dev/null", "-w", "%{http_code}").stdout.encode())


# --- streaming with flat memory ------------------------------------------------------------------


def test_large_upload_streams_with_flat_memory(edge: EdgeProcess) -> None:
    assert edge.proc is not None
    size = 300 * 1024 * 1024
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with tls_socket(edge) as sock:
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {size}\r\n\r\n".encode())
        _, hwm_before = rss_kib(edge.proc.pid)
        for _ in range(size // len(block)):
            sock.sendall(block)
            digest.update(block)
        status, _, body = read_response(sock, bytearray())
    rss, hwm_after = rss_kib(edge.proc.pid)
    echo = json.loads(body)
    assert status.startswith(b"HTTP/1.1 200")
    assert echo["body_length"] == size and echo["body_sha256"] == digest.hexdigest()
    grown = hwm_after - hwm_before
    print(f"300 MiB upload: edge peak RSS grew {grown} KiB (RSS now {rss} KiB)")
    assert grown < 40 * 1024, f"edge held the upload in memory: peak RSS +{grown} KiB"


def test_slow_reader_download_keeps_memory_flat(edge: EdgeProcess) -> None:
    assert edge.proc is not None
    size = 200 * 1024 * 1024
    with tls_socket(edge) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        _, hwm_before = rss_kib(edge.proc.pid)
        received = 0
        # A slow reader: 64 KiB every 10 ms for 1.5 s (~6 MiB/s against a backend
        # that could send hundreds): edge must stop reading the backend meanwhile.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            received += len(sock.recv(65536))
            time.sleep(0.01)
        _, hwm_slow = rss_kib(edge.proc.pid)
        while received < size + 40:  # the head is ~40 bytes
            chunk = sock.recv(1 << 20)
            assert chunk
            received += len(chunk)
    grown = hwm_slow - hwm_before
    print(f"slow reader: edge peak RSS grew {grown} KiB while the client lagged")
    assert grown < 40 * 1024, f"edge buffered the download: peak RSS +{grown} KiB"


# --- upgrades --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def websocket_backend() -> Iterator[str]:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        return ws

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_websocket_echo_through_edge(edge: EdgeProcess, websocket_backend: str) -> None:
    edge.cli("apps-add", "chat", "--backend", websocket_backend)
    edge.wait_routed("chat.edge.test", "/ws")

    async def talk() -> list[object]:
        ctx = ssl.create_default_context(cafile=str(edge.dev_ca))
        async with aiohttp.ClientSession() as session, session.ws_connect(
            f"wss://127.0.0.1:{edge.https_port}/ws", ssl=ctx, server_hostname="chat.edge.test",
            headers={"Host": "chat.edge.test"},
        ) as ws:
            out: list[object] = []
            await ws.send_str("hello")
            out.append((await ws.receive(timeout=5)).data)
            await ws.send_bytes(b"\x01\x02\x03")
            out.append((await ws.receive(timeout=5)).data)
            big = "x" * 300_000
            await ws.send_str(big)
            out.append(len((await ws.receive(timeout=5)).data))
            return out

    assert asyncio.run(talk()) == ["echo:hello", b"\x03\x02\x01", 300_005]


def test_refused_upgrade_is_an_ordinary_response(edge: EdgeProcess) -> None:
    with tls_socket(edge) as sock:
        sock.sendall(f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode())
        status, headers, body = read_response(sock, bytearray())
    assert status.startswith(b"HTTP/1.1 200")  # the echo backend ignores the upgrade
    assert headers.get(b"connection") == b"close"
    assert json.loads(body)["path"] == "/x"


# --- port 80 ---------------------------------------------------------------------------------------


def test_acme_challenge_answered_from_store_on_port_80(edge: EdgeProcess) -> None:
    store = FileStore(edge.root / "store")
    asyncio.run(store.put(challenge_key("tok-123"), b"tok-123.thumbprint"))
    result = edge.curl(f"http://any.example.org:{edge.http_port}/.well-known/acme-challenge/tok-123")
    assert result.stdout == "tok-123.thumbprint"
    missing = edge.curl(f"http://any.example.org:{edge.http_port}/.well-known/acme-challenge/nope",
                        "-o", "/dev/null", "-w", "%{http_code}")
    assert missing.stdout == "404"


# --- timeouts (short ones, in an edge of their own) -----------------------------------------------


@pytest.fixture(scope="module")
def hung_backend() -> Iterator[str]:
    """Accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for sock in held:
        sock.close()
    server.close()


@pytest.fixture(scope="module")
def quick_edge(tmp_path_factory: pytest.TempPathFactory, backend: str, hung_backend: str) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("quick"))
    text = process.config.read_text().replace(
        "[proxy]\nhandshake_timeout = 5",
        "[proxy]\nhandshake_timeout = 5\nrequest_head_timeout = 1\nidle_timeout = 1\nresponse_timeout = 1",
    ).replace('level = "debug"', 'level = "info"\naccess_log = true')
    process.config.write_text(text)
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    process.cli("apps-add", "hung", "--backend", hung_backend)
    process.wait_routed("hung.edge.test")
    yield process
    process.stop()


def test_slow_head_cut_off_with_408(quick_edge: EdgeProcess) -> None:
    with tls_socket(quick_edge) as sock:
        started = time.monotonic()
        # A byte every 100 ms (a slowloris): each byte is progress, but the
        # head as a whole must arrive within request_head_timeout (1 s here).
        sock.settimeout(0.1)
        answer = b""
        for byte in b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nX-Slow: " + b"s" * 100:
            sock.sendall(bytes([byte]))
            try:
                answer = sock.recv(65536)  # TLS 1.3 tickets are consumed inside; only data returns
                break
            except TimeoutError:
                continue
        answered_after = time.monotonic() - started
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert answered_after < 3


def test_idle_keepalive_closed(quick_edge: EdgeProcess) -> None:
    with tls_socket(quick_edge) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        read_response(sock, bytearray())
        started = time.monotonic()
        assert sock.recv(1) == b""  # edge closes the idle connection
        assert 0.5 < time.monotonic() - started < 3


def test_backend_that_never_answers_gets_504(quick_edge: EdgeProcess) -> None:
    with tls_socket(quick_edge, "hung.edge.test") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: hung.edge.test\r\n\r\n")
        status, _, body = read_response(sock, bytearray())
    assert status.startswith(b"HTTP/1.1 504 Gateway Timeout") and b"504" in body


def test_access_log_line(quick_edge: EdgeProcess) -> None:
    with tls_socket(quick_edge) as sock:
        sock.sendall(f"GET /logged?q=1 HTTP/1.1\r\nHost: {HOST}\r\nX-Request-ID: log-me\r\n\r\n".encode())
        read_response(sock, bytearray())

    def line() -> dict | None:
        for raw in bytes(quick_edge.log).decode().splitlines():
            if '"request_id":"log-me"' in raw:
                return json.loads(raw[raw.index("{"):])
        return None

    entry = wait_for(line)
    assert entry["host"] == HOST and entry["method"] == "GET" and entry["path"] == "/logged?q=1"
    assert entry["status"] == 200 and entry["bytes"] > 0 and entry["tls"] == "TLSv1.3"
    assert entry["cert"] == "platform" and entry["backend"].startswith("127.0.0.1:")
    assert entry["duration_ms"] >= 0


def test_sigterm_finishes_in_flight_request(tmp_path_factory: pytest.TempPathFactory, backend: str) -> None:
    process = EdgeProcess(tmp_path_factory.mktemp("drain"))
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    assert process.proc is not None
    with tls_socket(process) as busy, tls_socket(process) as idle:
        idle.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        read_response(idle, bytearray())
        busy.sendall(f"GET /slow/800 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        time.sleep(0.2)
        process.proc.send_signal(signal.SIGTERM)
        assert idle.recv(1) == b""  # the idle keep-alive connection is closed at once
        status, headers, _ = read_response(busy, bytearray())
        assert status.startswith(b"HTTP/1.1 200") and headers.get(b"connection") == b"close"
    assert process.proc.wait(10) == 0
    # New connections are refused once it stopped listening.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", process.https_port), timeout=1)
