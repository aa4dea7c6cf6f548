"""edge.h2 against python-hyper's h2 client: what one sends, the other reads."""

from __future__ import annotations

import h2.events

from edge.h2 import H2Settings
from edge.h2.events import DataReceived, RequestReceived, StreamReset, TrailersReceived, WindowOpened
from edge.h2.frames import END_HEADERS, END_STREAM, FrameType

from .conftest import REQUEST, Pair, frame


def test_request_and_response(pair: Pair) -> None:
    events = pair.request(1, [*REQUEST, ("user-agent", "oracle"), ("accept", "*/*")])
    assert len(events) == 1 and isinstance(events[0], RequestReceived)
    req = events[0].request
    assert (req.method, req.scheme, req.authority, req.path) == (b"GET", b"https", b"a.example", b"/")
    assert req.fields == ((b"user-agent", b"oracle"), (b"accept", b"*/*"))
    assert events[0].end_stream
    pair.server.send_headers(1, [(b":status", b"200"), (b"content-type", b"text/plain")])
    pair.server.send_data(1, b"hello", end_stream=True)
    pair.pump()
    (resp,) = pair.client_of(h2.events.ResponseReceived)
    assert resp.headers == [(b":status", b"200"), (b"content-type", b"text/plain")]
    assert b"".join(e.data for e in pair.client_of(h2.events.DataReceived)) == b"hello"
    assert pair.client_of(h2.events.StreamEnded) and pair.server.idle


def test_request_body_and_trailers(pair: Pair) -> None:
    pair.request(1, [(":method", "POST"), *REQUEST[1:], ("content-length", "11")], end=False)
    pair.client.send_data(1, b"hello ")
    pair.client.send_data(1, b"world")
    pair.client.send_headers(1, [("x-checksum", "abc")], end_stream=True)
    events = pair.pump()
    body = b"".join(e.data for e in events if isinstance(e, DataReceived))
    assert body == b"hello world"
    (trailers,) = [e for e in events if isinstance(e, TrailersReceived)]
    assert trailers.fields == ((b"x-checksum", b"abc"),)
    pair.server.send_headers(1, [(b":status", b"200")])
    pair.server.send_trailers(1, [(b"grpc-status", b"0")])
    pair.pump()
    (got,) = pair.client_of(h2.events.TrailersReceived)
    assert got.headers == [(b"grpc-status", b"0")]


def test_large_response_waits_for_the_window_and_resumes(pair: Pair) -> None:
    pair.request(1)
    body = bytes(range(256)) * 1024  # 256 KiB, four times the initial window
    pair.server.send_headers(1, [(b":status", b"200")])
    pair.server.send_data(1, body, end_stream=True)
    pair.pump()
    received = sum(len(e.data) for e in pair.client_of(h2.events.DataReceived))
    assert received == 65_535 and pair.server.buffered(1) == len(body) - 65_535
    got = b""
    for _ in range(20):
        for e in pair.client_of(h2.events.DataReceived):
            pair.client.acknowledge_received_data(e.flow_controlled_length, 1)
        got += b"".join(e.data for e in pair.client_of(h2.events.DataReceived))
        pair.client_events.clear()
        events = pair.pump()
        if pair.client_of(h2.events.StreamEnded):
            got += b"".join(e.data for e in pair.client_of(h2.events.DataReceived))
            break
        assert any(isinstance(e, WindowOpened) for e in events)
    assert got == body and pair.server.idle


def test_one_stream_that_is_not_read_does_not_hold_the_others() -> None:
    pair = Pair()
    pair.client.increment_flow_control_window(10 * 1024 * 1024)
    pair.request(1)
    pair.request(3)
    pair.server.send_headers(1, [(b":status", b"200")])
    pair.server.send_data(1, b"x" * 200_000)  # stream 1 is never read: it stalls at 64 KiB
    pair.server.send_headers(3, [(b":status", b"200")])
    pair.server.send_data(3, b"y" * 50_000, end_stream=True)
    pair.pump()
    data3 = b"".join(e.data for e in pair.client_of(h2.events.DataReceived) if e.stream_id == 3)
    assert data3 == b"y" * 50_000
    assert pair.server.buffered(1) == 200_000 - 65_535


def test_many_streams_and_a_changing_table() -> None:
    """Requests with new literal fields change the HPACK table between repeated
    (cached, indexed-only) ones: every request still decodes to what was sent."""
    pair = Pair(H2Settings(max_concurrent_streams=1000))
    sent = {}
    for n in range(1, 400, 2):
        headers = [*REQUEST[:3], (":path", f"/{n % 7}"), ("cookie", f"c={n % 5}")]
        if n % 11 == 0:
            headers.append((f"x-new-{n}", "v" * (n % 50)))
        sent[n] = headers
        events = pair.request(n, headers)
        (ev,) = events
        assert isinstance(ev, RequestReceived)
        got = [(b":method", ev.request.method), (b":scheme", ev.request.scheme)]
        got += [(b":authority", ev.request.authority), (b":path", ev.request.path), *ev.request.fields]
        assert got == [(k.encode(), v.encode()) for k, v in headers]
        pair.server.send_headers(n, [(b":status", b"204")], end_stream=True)
    pair.pump()
    assert len(pair.client_of(h2.events.StreamEnded)) == 200


def test_client_reset_reaches_the_application(pair: Pair) -> None:
    pair.request(1, end=False)
    pair.client.reset_stream(1)
    (ev,) = pair.pump()
    assert isinstance(ev, StreamReset) and ev.remote and ev.stream_id == 1
    assert pair.server.idle


def test_upload_is_flow_controlled_by_what_the_application_passes_on(pair: Pair) -> None:
    pair.request(1, [(":method", "POST"), *REQUEST[1:]], end=False)
    window = pair.client.local_flow_control_window(1)
    for i in range(0, window, 16384):
        pair.client.send_data(1, b"a" * min(16384, window - i))
    pair.pump()
    assert pair.client.local_flow_control_window(1) == 0  # nothing given back yet
    pair.server.ack_data(1, window)
    pair.pump()
    assert pair.client.local_flow_control_window(1) == window


def test_graceful_goaway_names_the_last_stream(pair: Pair) -> None:
    pair.request(1, end=False)
    block = pair.client.encoder.encode(REQUEST)
    pair.server.close()
    pair.pump()
    (ev,) = pair.client_of(h2.events.ConnectionTerminated)
    assert ev.last_stream_id == 1 and ev.error_code == 0
    # A stream opened after GOAWAY is ignored (RFC 9113 §6.8); stream 1 may still finish.
    late = frame(FrameType.HEADERS, END_HEADERS | END_STREAM, 3, block)
    events = pair.to_server(late + frame(FrameType.DATA, END_STREAM, 1))
    assert len(events) == 1 and isinstance(events[0], DataReceived) and events[0].end_stream
    assert not pair.server.idle
    pair.server.send_headers(1, [(b":status", b"204")], end_stream=True)
    assert pair.server.idle


def test_responses_decode_after_the_client_shrinks_its_table() -> None:
    """Our encoder uses no dynamic table; a smaller SETTINGS_HEADER_TABLE_SIZE is
    acknowledged with a size update at the start of the next block (RFC 7541 §4.2)."""
    import h2.settings

    pair = Pair()
    pair.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    pair.pump()
    for sid in (1, 3):
        pair.request(sid)
        fields = [(b":status", b"404"), (b"server", b"edge"), (b"x-long-name-not-in-static", b"value")]
        pair.server.send_headers(sid, fields, end_stream=True)
        pair.pump()
    responses = pair.client_of(h2.events.ResponseReceived)
    assert [r.headers for r in responses] == [fields, fields]
