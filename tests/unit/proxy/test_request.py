"""The request-response object: its transition table, the one keep-alive rule,
and the same rules driven from an HTTP/1.1 connection and an HTTP/2 stream
(real protocol objects on a fake transport, a fake backend connection)."""

from __future__ import annotations

import asyncio
import itertools

import h2.events
import pytest

from edge.proxy import forwarding, upstream
from edge.proxy.downstream import keeps_alive
from edge.proxy.phase import NEXT, IllegalTransition, Phase
from edge.proxy.request import Request
from tests.unit.proxy.test_h2proto import FakeBackend, exchange_bytes, request, setup
from tests.unit.proxy.test_protocol import make_protocol, run, status_of


def _request_in(phase: Phase) -> Request:
    protocol, _ = make_protocol()
    req = Request(protocol)
    req.phase = phase
    return req


@pytest.mark.parametrize(("old", "new"), list(itertools.product(Phase, Phase)))
def test_the_transition_table_is_the_only_way_between_phases(old: Phase, new: Phase) -> None:
    async def scenario():
        req = _request_in(old)
        if NEXT[old] & new:
            req.to(new)
            assert req.phase is new
        else:
            with pytest.raises(IllegalTransition):
                req.to(new)
            assert req.phase is old
    run(scenario)


def test_done_and_aborted_are_final_and_every_phase_can_abort() -> None:
    assert NEXT[Phase.DONE] == 0 and NEXT[Phase.ABORTED] == 0
    assert all(NEXT[p] & Phase.ABORTED for p in Phase if p not in (Phase.DONE, Phase.ABORTED))
    # An answer is given only before the response head: never from RESPONDING, TUNNEL or an end.
    assert not any(NEXT[p] & Phase.RESPONDING for p in (Phase.RESPONDING, Phase.TUNNEL, Phase.DONE))


def test_one_keep_alive_rule() -> None:
    async def scenario():
        req = _request_in(Phase.RESPONDING)
        assert keeps_alive(req, draining=False)
        assert not keeps_alive(req, draining=True)  # shutting down
        assert not keeps_alive(req, draining=False, close_delimited=True)  # the body ends with the connection
        req.body_expected = True
        assert not keeps_alive(req, draining=False)  # its body is still coming: not read for nobody
        req.request_done = True
        assert keeps_alive(req, draining=False)
        req.upgrade = True
        assert not keeps_alive(req, draining=False)  # the parser is spent after an Upgrade head
        req.upgrade = False
        req.keep_alive = False  # the client's Connection: close, or an answer that ends trust
        assert not keeps_alive(req, draining=False)
    run(scenario)


def _h1_forwarded(monkeypatch, raw: bytes):
    """An HTTP/1.1 connection whose request went to a fake backend."""
    backend = FakeBackend()
    monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: backend)
    protocol, transport = make_protocol()
    protocol.data_received(raw)
    assert backend.sink is protocol.queue[0]  # the backend talks to the request, not the connection
    return protocol, transport, backend


@pytest.mark.patches_compiled  # Backend.take_idle
def test_a_late_backend_answer_after_the_504_is_ignored_on_http1(monkeypatch) -> None:
    async def scenario():
        protocol, transport, backend = _h1_forwarded(
            monkeypatch, b"GET / HTTP/1.1\r\nHost: demo.apps.test\r\n\r\n")
        req = backend.sink
        req.timed_out()
        assert req.phase is Phase.DONE and backend.closed
        assert status_of(transport) == b"HTTP/1.1 504 Gateway Timeout"
        written = bytes(transport.written)
        req.response_head(200, b"OK", [], True, False, 2)  # a callback after the end: no second answer
        req.response_body(b"ok")
        req.response_complete()
        assert bytes(transport.written) == written
        assert protocol.shared.stats.status_classes[5] == 1 and sum(protocol.shared.stats.status_classes) == 1
    run(scenario)


@pytest.mark.patches_compiled  # Backend.take_idle
def test_a_late_backend_answer_after_the_504_is_ignored_on_http2(monkeypatch) -> None:
    backend = FakeBackend()

    async def scenario():
        proto, transport, client = setup()
        monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: backend)
        request(client, 1)
        exchange_bytes(proto, transport, client)
        req = backend.sink
        req.timed_out()
        events = exchange_bytes(proto, transport, client)
        (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(resp.headers)[b":status"] == b"504" and req.phase is Phase.DONE
        req.response_head(200, b"OK", [], True, False, 2)
        req.response_complete()
        assert not exchange_bytes(proto, transport, client)
        assert proto.shared.stats.protocols == {"2": 1}
    run(scenario)


@pytest.mark.patches_compiled  # Backend.take_idle
def test_a_body_less_response_is_counted_once_on_http2(monkeypatch) -> None:
    backend = FakeBackend()

    async def scenario():
        proto, transport, client = setup()
        monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: backend)
        request(client, 1)
        exchange_bytes(proto, transport, client)
        backend.sink.response_head(204, b"No Content", [], True, False, None)
        backend.sink.response_complete()  # as BackendConnection calls it after a 204's head
        events = exchange_bytes(proto, transport, client)
        (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(resp.headers)[b":status"] == b"204" and resp.stream_ended is not None
        assert proto.shared.stats.protocols == {"2": 1} and not proto.exchanges
    run(scenario)


@pytest.mark.patches_compiled  # Backend.take_idle
def test_an_unsolicited_101_is_a_502_on_both_protocols(monkeypatch) -> None:
    async def scenario():
        _, transport, backend = _h1_forwarded(
            monkeypatch, b"GET / HTTP/1.1\r\nHost: demo.apps.test\r\n\r\n")
        backend.sink.response_head(101, b"Switching Protocols", [(b"upgrade", b"websocket")], False, False, None)
        assert status_of(transport) == b"HTTP/1.1 502 Bad Gateway" and backend.closed

        h2_backend = FakeBackend()
        monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: h2_backend)
        proto, h2_transport, client = setup()
        request(client, 1)
        exchange_bytes(proto, h2_transport, client)
        h2_backend.sink.response_head(101, b"Switching Protocols", [(b"upgrade", b"h2c")], False, False, None)
        events = exchange_bytes(proto, h2_transport, client)
        (resp,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        assert dict(resp.headers)[b":status"] == b"502" and h2_backend.closed
    run(scenario)


def _h2_upload(monkeypatch, headers: list[tuple[str, str]], attach_first: bool) -> bytes:
    """An HTTP/2 request with a body and trailers; what the backend received.
    ``attach_first``: a pooled backend connection takes the head at once; else
    the connection comes once the whole request (trailers too) is held."""
    backend = FakeBackend()
    connecting: list = []

    async def connect_later(req, candidates, head, fresh=False):
        connecting.append((req, head))

    async def scenario():
        proto, transport, client = setup()
        monkeypatch.setattr(upstream.Backend, "take_idle", lambda self: backend if attach_first else None)
        monkeypatch.setattr(forwarding, "connect", connect_later)
        client.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", "demo.apps.test"),
                                (":path", "/upload"), *headers])
        client.send_data(1, b"hello ")
        client.send_data(1, b"world")
        client.send_headers(1, [("x-checksum", "abc"), ("content-length", "99")], end_stream=True)
        exchange_bytes(proto, transport, client)
        await asyncio.sleep(0)  # the connecting task runs
        assert len(connecting) == (0 if attach_first else 1)
        for req, head in connecting:
            req.connected(backend, "127.0.0.1:9", None, head)
    run(scenario)
    return bytes(backend.written)


@pytest.mark.patches_compiled  # Backend.take_idle
@pytest.mark.parametrize("attach_first", [True, False])
def test_h2_request_trailers_reach_the_backend_in_a_chunked_body(monkeypatch, attach_first: bool) -> None:
    sent = _h2_upload(monkeypatch, [], attach_first)
    head, _, body = sent.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head and b"content-length" not in head
    # RFC 9112 §7.1.2: the trailer section follows the last chunk; framing fields never go in it.
    assert body == b"6\r\nhello \r\n5\r\nworld\r\n0\r\nx-checksum: abc\r\n\r\n"


@pytest.mark.patches_compiled  # Backend.take_idle
def test_h2_request_trailers_are_dropped_with_a_content_length(monkeypatch) -> None:
    sent = _h2_upload(monkeypatch, [("content-length", "11")], attach_first=True)
    head, _, body = sent.partition(b"\r\n\r\n")
    assert b"content-length: 11" in head and b"transfer-encoding" not in head
    assert body == b"hello world"  # no place for trailers without chunked framing
