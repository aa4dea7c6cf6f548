"""The HTTP/2 client side (H2ProxyProtocol driving its streams' Requests) on a fake transport,
an h2 client (python-hyper) in front and a fake backend connection behind."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import pytest

from edge.config import ProxyConfig
from edge.proxy import upstream
from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.proxy.h2proto import H2ProxyProtocol
from edge.proxy.h2stream import STREAM_HIGH_WATER
from edge.proxy.request import Phase
from tests.unit.proxy.test_protocol import FakeTransport, make_protocol


class FakeBackend:
    """What a Request sees of a BackendConnection."""

    reused = False

    def __init__(self) -> None:
        self.sink = None
        self.written = bytearray()
        self.paused = False
        self.closed = False

    def start(self, sink, head_only: bool) -> None:
        self.sink = sink

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True


def setup(**limits):
    base, _ = make_protocol()  # the router and index of the HTTP/1.1 tests
    shared = ProxyContext(base.shared.router, ProxyConfig(**limits))
    proto = H2ProxyProtocol(shared, ListenerInfo(b"https", b"443", 443), base.tls)
    transport = FakeTransport()
    proto.connection_made(transport)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return proto, transport, client


def exchange_bytes(proto, transport, client) -> list:
    """Client bytes to edge, then everything edge wrote (after the loop turn) to the client."""
    proto.data_received(client.data_to_send())
    proto.flush_now()
    out = bytes(transport.written)
    transport.written.clear()
    return client.receive_data(out) if out else []


def request(client, sid: int, authority: str = "demo.apps.test", path: str = "/", end: bool = True) -> None:
    client.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)],
                        end_stream=end)


def run(fn):
    async def main():
        return fn()
    return asyncio.run(main())


def test_answers_per_stream_and_421_for_another_certificate() -> None:
    def body():
        proto, transport, client = setup()
        request(client, 1, "nope.test")
        request(client, 3, "www.custom.test")  # routed to demo, but its own certificate: misdirected
        events = exchange_bytes(proto, transport, client)
        responses = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        statuses = {e.stream_id: dict(e.headers)[b":status"] for e in responses}
        assert statuses == {1: b"404", 3: b"421"}
        assert not proto.exchanges
    run(body)


@pytest.mark.patches_compiled  # Backend.take_idle
def test_forwarded_request_and_streamed_response_with_back_pressure(monkeypatch) -> None:
    backend = FakeBackend()

    def body():
        proto, transport, client = setup()
        monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: backend)
        request(client, 1)
        exchange_bytes(proto, transport, client)
        head = bytes(backend.written)
        assert head.startswith(b"GET / HTTP/1.1\r\n") and b"host: demo.apps.test\r\n" in head
        assert b"x-forwarded-proto: https\r\n" in head and b"x-request-id: " in head
        sink = backend.sink
        sink.response_head(200, b"OK", [(b"content-type", b"text/plain"), (b"connection", b"keep-alive")],
                           True, True, None)
        for _ in range(10):  # 160 KiB: the client's window (64 KiB) fills, the rest queues
            sink.response_body(b"x" * 16384)
        assert backend.paused and proto.h2.buffered(1) > STREAM_HIGH_WATER
        events = exchange_bytes(proto, transport, client)
        (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert resp.headers == [(b":status", b"200"), (b"content-type", b"text/plain")]  # no connection field
        client.increment_flow_control_window(10 * 1024 * 1024)
        for _ in range(5):  # the client reads what came: the queue drains, the backend goes on
            got = sum(e.flow_controlled_length for e in events if isinstance(e, h2.events.DataReceived))
            client.acknowledge_received_data(got, 1)
            events = exchange_bytes(proto, transport, client)
        assert not backend.paused and proto.h2.buffered(1) == 0
        sink.response_complete()
        events = exchange_bytes(proto, transport, client)
        assert any(isinstance(e, h2.events.StreamEnded) for e in events)
        assert proto.exchanges == {}
    run(body)


@pytest.mark.patches_compiled  # Backend.take_idle
def test_a_stalled_stream_is_reset_at_the_response_timeout(monkeypatch) -> None:
    backend = FakeBackend()

    def body():
        proto, transport, client = setup(response_timeout=5)
        monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: backend)
        request(client, 1)
        exchange_bytes(proto, transport, client)
        exchange = proto.exchanges[1]
        exchange.response_head(200, b"OK", [], True, True, None)
        exchange.deadline = proto._loop.time() - 1  # as if 5 s passed without progress
        proto._tick()
        events = exchange_bytes(proto, transport, client)
        assert exchange.phase is Phase.ABORTED and backend.closed
        assert any(isinstance(e, h2.events.StreamReset) for e in events)
        proto.connection_lost(None)
    run(body)


@pytest.mark.patches_compiled  # Backend.take_idle
def test_no_answer_from_the_backend_is_504(monkeypatch) -> None:
    backend = FakeBackend()

    def body():
        proto, transport, client = setup()
        monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: backend)
        request(client, 1)
        exchange_bytes(proto, transport, client)
        proto.exchanges[1].deadline = proto._loop.time() - 1
        proto._tick()
        events = exchange_bytes(proto, transport, client)
        (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(resp.headers)[b":status"] == b"504" and backend.closed
        proto.connection_lost(None)
    run(body)


def test_idle_connection_gets_goaway_and_closes() -> None:
    def body():
        proto, transport, client = setup(idle_timeout=1, request_head_timeout=1)
        exchange_bytes(proto, transport, client)
        proto._idle_since -= 5
        proto._tick()
        events = client.receive_data(bytes(transport.written))
        assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 0 for e in events)
        assert transport.closed
    run(body)


@pytest.mark.patches_compiled  # Backend.take_idle
def test_a_client_reading_nothing_pauses_every_backend(monkeypatch) -> None:
    backends = [FakeBackend(), FakeBackend()]

    def body():
        proto, transport, client = setup()
        it = iter(backends)
        monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: next(it))
        request(client, 1)
        request(client, 3)
        exchange_bytes(proto, transport, client)
        for b in backends:
            b.sink.response_head(200, b"OK", [], True, True, None)
        proto.pause_writing()
        assert all(b.paused for b in backends) and transport.paused
        proto.resume_writing()
        assert not any(b.paused for b in backends) and not transport.paused
        proto.connection_lost(None)
        assert all(b.closed for b in backends)
    run(body)
