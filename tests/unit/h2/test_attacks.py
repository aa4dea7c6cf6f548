"""Each known HTTP/2 attack, reproduced against the connection: it ends the way
HAProxy and nginx end it (GOAWAY, ENHANCE_YOUR_CALM) with memory bounded, while
ordinary traffic of the same frames goes through."""

from __future__ import annotations

import hpack

from edge.h2 import H2Settings
from edge.h2.errors import ErrorCode as E
from edge.h2.events import ConnectionTerminated, RequestReceived
from edge.h2.frames import END_HEADERS, END_STREAM
from edge.h2.frames import FrameType as T

from .conftest import frame, goaway_code, raw_server
from .test_frames import GET, block, headers


def _until_goaway(server, frames_iter, limit: int) -> int:
    """Feed frames until the server ends the connection; how many it took."""
    for n, data in enumerate(frames_iter, 1):
        events = server.receive_data(data)
        if events and isinstance(events[-1], ConnectionTerminated):
            assert goaway_code(server.data_to_send()) == E.ENHANCE_YOUR_CALM
            return n
        server.data_to_send()
        assert n < limit, "the attack was never refused"
    raise AssertionError("ran out of frames")


def test_rapid_reset_cve_2023_44487() -> None:
    server = raw_server()
    pairs = (headers(sid, flags=END_HEADERS) + frame(T.RST_STREAM, 0, sid, b"\0\0\0\x08") for sid in range(1, 10**6, 2))
    n = _until_goaway(server, pairs, 20_000)
    assert n <= 1_001 and not server.streams


def test_cancelled_requests_among_answered_ones_are_fine() -> None:
    server = raw_server()
    for sid in range(1, 20_000, 2):
        server.receive_data(headers(sid))
        if sid % 3 == 0:
            server.receive_data(frame(T.RST_STREAM, 0, sid, b"\0\0\0\x08"))
        else:
            server.send_headers(sid, [(b":status", b"204")], end_stream=True)
        assert goaway_code(server.data_to_send()) is None
    assert server.state.name == "OPEN"


def test_continuation_flood_cve_2024_27316() -> None:
    server = raw_server()
    start = [frame(T.HEADERS, 0, 1, block())]
    conts = (frame(T.CONTINUATION, 0, 1, b"\x40\x01a\x01b" * 3000) for _ in range(10**6))
    n = _until_goaway(server, iter(start + list(_take(conts, 100))), 100)
    assert n <= 10  # 128 KiB of header block at most


def test_empty_continuation_flood() -> None:
    server = raw_server()
    flood = iter([frame(T.HEADERS, 0, 1, block()), *(frame(T.CONTINUATION, 0, 1) for _ in range(5000))])
    assert _until_goaway(server, flood, 5000) <= 300


def test_hpack_bomb() -> None:
    """One 4 KiB field in the table, then a block naming it thousands of times:
    the decoded list stops at the hard bound; a smaller excess is flagged (431)."""
    server = raw_server(H2Settings(max_header_list_size=16 * 1024, hard_header_list_size=64 * 1024))
    enc = hpack.Encoder()
    first = enc.encode([*GET, (b"x-bomb", b"a" * 4000)])  # inserted at index 62
    (ev,) = server.receive_data(frame(T.HEADERS, END_HEADERS | END_STREAM, 1, first))
    assert isinstance(ev, RequestReceived) and not ev.request.too_large
    again = enc.encode(GET)  # indexed only, so x-bomb stays at index 62
    (ev,) = server.receive_data(frame(T.HEADERS, END_HEADERS | END_STREAM, 3, again + b"\xbe" * 5))
    assert ev.request.too_large  # ~20 KiB decoded: answered 431, the table stays in step
    bomb = again + b"\xbe" * 16000  # 16 KB on the wire, 64 MB decoded without a bound
    (end,) = server.receive_data(frame(T.HEADERS, END_HEADERS | END_STREAM, 5, bomb[:16384]))
    assert isinstance(end, ConnectionTerminated) and end.error_code == E.ENHANCE_YOUR_CALM


def test_hpack_table_is_bounded() -> None:
    """A client may not make us keep more than 4096 octets of table (nor encode with more)."""
    server = raw_server()
    server.receive_data(frame(T.SETTINGS, 0, 0, b"\0\x01\x7f\xff\xff\xff"))  # its table: 2 GiB
    server.receive_data(headers(1))
    head = [(b":status", b"200"), (b"x-big", b"v" * 3000)]
    server.send_headers(1, head)
    server.send_headers(1, head, end_stream=True)
    out = server.data_to_send()
    assert out.count(b"v" * 3000) == 2  # our encoder keeps no table, whatever the client allows
    enc = hpack.Encoder()
    for sid in range(3, 200, 2):
        server.receive_data(
            frame(T.HEADERS, END_HEADERS | END_STREAM, sid, enc.encode([*GET, (b"x", b"%d" % sid * 50)]))
        )
    assert server._decoder._decoder.header_table._current_size <= 4096
    big = hpack.Encoder()
    big.header_table_size = 1 << 20  # announces a 1 MiB table: refused
    (end,) = server.receive_data(frame(T.HEADERS, END_HEADERS | END_STREAM, 201, big.encode(GET)))
    assert isinstance(end, ConnectionTerminated) and end.error_code == E.COMPRESSION_ERROR


def test_settings_flood() -> None:
    server = raw_server()
    flood = (frame(T.SETTINGS, 0, 0, b"\0\x03\0\0\0\x64") for _ in range(10**6))
    assert _until_goaway(server, flood, 2000) <= 1001


def test_ping_flood() -> None:
    server = raw_server()
    flood = (frame(T.PING, 0, 0, b"12345678") for _ in range(10**6))
    assert _until_goaway(server, flood, 2000) <= 1001


def test_empty_data_flood() -> None:
    server = raw_server()
    server.receive_data(headers(1, flags=END_HEADERS))
    flood = (frame(T.DATA, 0, 1) for _ in range(10**6))
    assert _until_goaway(server, flood, 2000) <= 1001


def test_priority_flood() -> None:
    server = raw_server()
    flood = (frame(T.PRIORITY, 0, sid, b"\0\0\0\0\x10") for sid in range(1, 10**6, 2))
    assert _until_goaway(server, flood, 2000) <= 1001


def test_streams_that_never_open_their_window_hold_only_what_was_queued() -> None:
    """Window 0 on every stream: DATA waits in the stream's queue, which the
    application bounds by pausing that stream's backend at a threshold (and
    times out); the connection itself sends nothing and keeps nothing more."""
    server = raw_server(H2Settings(max_concurrent_streams=100))
    server.receive_data(frame(T.SETTINGS, 0, 0, b"\0\x04\0\0\0\0"))
    server.data_to_send()
    server.receive_data(b"".join(headers(sid) for sid in range(1, 201, 2)))
    for sid in range(1, 201, 2):
        server.send_headers(sid, [(b":status", b"200")])
        server.send_data(sid, b"x" * 65536)
    out = server.data_to_send()
    assert b"x" not in out  # heads only
    assert sum(server.buffered(sid) for sid in range(1, 201, 2)) == 100 * 65536
    server.receive_data(b"".join(headers(sid) for sid in range(201, 211, 2)))
    assert len(server.streams) == 100  # the 101st and later are refused
    for sid in range(1, 201, 2):
        server.reset_stream(sid)
    assert not server.streams and not server._sender.blocked


def _take(it, n):
    for _, x in zip(range(n), it, strict=False):
        yield x


def test_legitimate_pings_and_settings_do_not_trip_the_budget() -> None:
    server = raw_server()
    for sid in range(1, 6001, 2):
        server.receive_data(headers(sid) + (frame(T.PING, 0, 0, b"12345678") if sid % 10 == 1 else b""))
        server.send_headers(sid, [(b":status", b"204")], end_stream=True)
        server.data_to_send()
    assert server.state.name == "OPEN"
    assert END_STREAM
