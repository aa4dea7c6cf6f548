"""The client-side protocol driven byte by byte on a fake transport."""

import asyncio
import json
import re

import pytest

from edge.config import ProxyConfig
from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.proxy.protocol import HttpProxyProtocol
from edge.proxy.routing import Router
from edge.records import CertMeta, encode_bundle
from edge.store.base import Event, EventKind
from edge.store.index import Index
from edge.tls.acceptor import TlsInfo
from edge.tls.selector import Selector, Source

PEM = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\ny\n"


class FakeTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def get_extra_info(self, name, default=None):
        return ("192.0.2.7", 5555) if name == "peername" else default

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def set_write_buffer_limits(self, high=None, low=None):
        self.high_water = high


def make_protocol(tls_name="demo.apps.test", https=True, force_https=True, **limits):
    index = Index()
    index.apply(Event(EventKind.PUT, "apps/demo", json.dumps(
        {"backends": ["127.0.0.1:9"], "force_https": force_https}).encode(), 1))
    index.apply(Event(EventKind.PUT, "domains/www.custom.test", b'{"app": "demo"}', 1))
    meta = CertMeta("www.custom.test", "custom", "ecdsa", 0, 4e9, "f")
    index.apply(Event(EventKind.PUT, meta.store_key, encode_bundle(meta, PEM), 1))
    selector = Selector(index, "apps.test", False)
    router = Router(index, selector, "apps.test", 4)
    info = TlsInfo(tls_name, Source.PLATFORM, ()) if https else None
    listener = ListenerInfo(b"https" if https else b"http", b"443", 443)
    protocol = HttpProxyProtocol(ProxyContext(router, ProxyConfig(**limits)), listener, info)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


class _ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a test moves on (``advance``) instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


async def advance(seconds: float) -> None:
    """Move the loop's clock on by ``seconds``: the timers due by then fire now."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, _ClockLoop)
    loop.offset += seconds
    for _ in range(3):  # a due timer runs in the next loop iteration; its callbacks in the one after
        await asyncio.sleep(0)


def run(coro_fn):
    with asyncio.Runner(loop_factory=_ClockLoop) as runner:
        return runner.run(coro_fn())


def status_of(transport):
    return bytes(transport.written).split(b"\r\n", 1)[0]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: nope.test\r\n\r\n", b"HTTP/1.1 404 Not Found"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 Bad Request"),  # HTTP/1.1 needs Host
        (b"POST / HTTP/1.1\r\nHost: demo.apps.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
         b"HTTP/1.1 400 Bad Request"),
        (b"POST / HTTP/1.1\r\nHost: demo.apps.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
         b"HTTP/1.1 400 Bad Request"),
        (b"GET / HTTP/1.1\r\nHost: demo.apps.test\r\nBad Header\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
        (b"GET / HTTP/1.1\nHost: demo.apps.test\n\n", b"HTTP/1.1 400 Bad Request"),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: demo.apps.test\r\nX: a\r\n folded\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: demo.apps.test\r\n\r\n", b"HTTP/1.1 414 URI Too Long"),
        (b"GET / HTTP/1.1\r\nHost: demo.apps.test\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n",
         b"HTTP/1.1 431 Request Header Fields Too Large"),
        (b"GET / HTTP/1.1\r\nHost: other.apps.test\r\n\r\n", b"HTTP/1.1 404 Not Found"),
        # SNI demo.apps.test (platform certificate), Host with a custom one: 421.
        (b"GET / HTTP/1.1\r\nHost: www.custom.test\r\n\r\n", b"HTTP/1.1 421 Misdirected Request"),
    ],
)
def test_error_answers(request_bytes, status):
    async def scenario():
        protocol, transport = make_protocol()
        protocol.data_received(request_bytes)
        return transport

    transport = run(scenario)
    assert status_of(transport) == status
    assert b"<html>" in transport.written


def test_malformed_request_closes_connection():
    async def scenario():
        protocol, transport = make_protocol()
        protocol.data_received(b"GARBAGE\r\n\r\n")
        return transport

    transport = run(scenario)
    assert status_of(transport) == b"HTTP/1.1 400 Bad Request"
    assert transport.closed


def test_error_answer_keeps_connection_alive_and_pipelines():
    """Two pipelined requests for unknown hosts, split at every byte boundary."""
    data = b"GET /a HTTP/1.1\r\nHost: x.test\r\n\r\nGET /b HTTP/1.1\r\nHost: y.test\r\n\r\n"

    async def scenario():
        protocol, transport = make_protocol(tls_name=None)
        for i in range(len(data)):
            protocol.data_received(data[i : i + 1])
        return transport

    transport = run(scenario)
    assert bytes(transport.written).count(b"HTTP/1.1 404 Not Found") == 2
    assert not transport.closed


def test_plain_http_redirects_to_https():
    async def scenario():
        protocol, transport = make_protocol(https=False)
        protocol.data_received(b"GET /path?q=1 HTTP/1.1\r\nHost: demo.apps.test:8080\r\n\r\n")
        return transport

    transport = run(scenario)
    assert status_of(transport) == b"HTTP/1.1 301 Moved Permanently"
    assert b"Location: https://demo.apps.test/path?q=1\r\n" in transport.written


def test_head_timeout_answers_408():
    async def scenario():
        protocol, transport = make_protocol(request_head_timeout=0.05)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: demo")
        await advance(0.2)
        return transport

    transport = run(scenario)
    assert status_of(transport) == b"HTTP/1.1 408 Request Timeout"
    assert transport.closed


@pytest.mark.parametrize("same_read", [True, False])
def test_a_slow_head_after_an_answer_gets_the_head_deadline_not_the_idle_one(same_read):
    # The head deadline is armed at the end of the read a head began in (not per
    # head): a keep-alive connection's next head, begun in the read that brought
    # the previous request or in a later one, still has only request_head_timeout.
    async def scenario():
        protocol, transport = make_protocol(request_head_timeout=0.05, idle_timeout=30)
        first, second = b"GET / HTTP/1.1\r\nHost: nope.test\r\n\r\n", b"GET / HTTP/1.1\r\nHo"
        if same_read:
            protocol.data_received(first + second)
        else:
            protocol.data_received(first)
            await advance(0.03)
            protocol.data_received(second)
        await advance(0.2)
        return transport

    transport = run(scenario)
    answers = re.findall(rb"HTTP/1\.1 \d{3} [^\r]*", bytes(transport.written))
    assert answers == [b"HTTP/1.1 404 Not Found", b"HTTP/1.1 408 Request Timeout"]
    assert transport.closed


def test_idle_keepalive_closed_after_timeout():
    async def scenario():
        protocol, transport = make_protocol(idle_timeout=0.05)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: nope.test\r\n\r\n")
        assert not transport.closed
        await advance(0.2)
        return transport

    assert run(scenario).closed


def test_drain_closes_a_served_idle_connection_and_lets_a_new_one_ask_once():
    async def scenario():
        served, served_transport = make_protocol()
        served.data_received(b"GET /x HTTP/1.1\r\nHost: nope.test\r\n\r\n")  # answered (404), kept alive
        assert not served_transport.closed
        fresh, fresh_transport = make_protocol()
        for protocol in (served, fresh):
            protocol.shared.draining = True
            protocol.drain()
        assert served_transport.closed
        assert not fresh_transport.closed  # its first request may be on the way
        fresh.data_received(b"GET /y HTTP/1.1\r\nHost: nope.test\r\n\r\n")
        assert status_of(fresh_transport) == b"HTTP/1.1 404 Not Found"
        assert b"connection: close\r\n" in fresh_transport.written and fresh_transport.closed

        silent, silent_transport = make_protocol()
        silent.shared.draining = True
        silent.drain()
        await advance(1.5)  # no request within the grace: closed
        assert silent_transport.closed and not silent_transport.written
    run(scenario)
