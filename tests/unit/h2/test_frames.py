"""The validity rules of RFC 9113 §4-6 and §8, frame by frame, on hand-written bytes.
(h2spec checks the same rules end to end over TLS; these pin them without a network.)"""

from __future__ import annotations

import hpack
import pytest

from edge.h2 import H2Settings
from edge.h2.errors import ErrorCode as E
from edge.h2.events import ConnectionTerminated, RequestReceived, StreamReset
from edge.h2.frames import ACK, END_HEADERS, END_STREAM, PADDED, PRIORITY
from edge.h2.frames import FrameType as T

from .conftest import frame, goaway_code, raw_server, rst_codes

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")]


def block(fields=GET) -> bytes:
    return hpack.Encoder().encode(fields)


def headers(sid: int, fields=GET, flags: int = END_HEADERS | END_STREAM) -> bytes:
    return frame(T.HEADERS, flags, sid, block(fields))


CONNECTION_ERRORS = {
    "invalid preface": (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, E.PROTOCOL_ERROR),
    "DATA on stream 0": (frame(T.DATA, 0, 0, b"x"), E.PROTOCOL_ERROR),
    "DATA on an idle stream": (frame(T.DATA, 0, 1, b"x"), E.PROTOCOL_ERROR),
    "HEADERS on stream 0": (frame(T.HEADERS, END_HEADERS, 0, block()), E.PROTOCOL_ERROR),
    "HEADERS on an even stream": (headers(2), E.PROTOCOL_ERROR),
    "pad longer than payload": (frame(T.HEADERS, END_HEADERS | PADDED, 1, b"\x09abc"), E.PROTOCOL_ERROR),
    "frame over max size": (frame(T.DATA, 0, 1, b"x" * 16385), E.FRAME_SIZE_ERROR),
    "RST_STREAM on stream 0": (frame(T.RST_STREAM, 0, 0, b"\0\0\0\0"), E.PROTOCOL_ERROR),
    "RST_STREAM on idle": (frame(T.RST_STREAM, 0, 1, b"\0\0\0\0"), E.PROTOCOL_ERROR),
    "RST_STREAM length": (headers(1, flags=END_HEADERS) + frame(T.RST_STREAM, 0, 1, b"\0\0\0"), E.FRAME_SIZE_ERROR),
    "SETTINGS on a stream": (frame(T.SETTINGS, 0, 1), E.PROTOCOL_ERROR),
    "SETTINGS ACK with payload": (frame(T.SETTINGS, ACK, 0, b"\0" * 6), E.FRAME_SIZE_ERROR),
    "SETTINGS length": (frame(T.SETTINGS, 0, 0, b"\0" * 5), E.FRAME_SIZE_ERROR),
    "ENABLE_PUSH 2": (frame(T.SETTINGS, 0, 0, b"\0\x02\0\0\0\x02"), E.PROTOCOL_ERROR),
    "INITIAL_WINDOW_SIZE 2^31": (frame(T.SETTINGS, 0, 0, b"\0\x04\x80\0\0\0"), E.FLOW_CONTROL_ERROR),
    "MAX_FRAME_SIZE small": (frame(T.SETTINGS, 0, 0, b"\0\x05\0\0\x10\0"), E.PROTOCOL_ERROR),
    "PING on a stream": (frame(T.PING, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR),
    "PING length": (frame(T.PING, 0, 0, b"\0" * 7), E.FRAME_SIZE_ERROR),
    "GOAWAY on a stream": (frame(T.GOAWAY, 0, 1, b"\0" * 8), E.PROTOCOL_ERROR),
    "WINDOW_UPDATE 0 on the connection": (frame(T.WINDOW_UPDATE, 0, 0, b"\0" * 4), E.PROTOCOL_ERROR),
    "WINDOW_UPDATE length": (frame(T.WINDOW_UPDATE, 0, 0, b"\0" * 3), E.FRAME_SIZE_ERROR),
    "WINDOW_UPDATE on idle": (frame(T.WINDOW_UPDATE, 0, 1, b"\0\0\0\1"), E.PROTOCOL_ERROR),
    "connection window overflow": (frame(T.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), E.FLOW_CONTROL_ERROR),
    "CONTINUATION without HEADERS": (frame(T.CONTINUATION, END_HEADERS, 1, block()), E.PROTOCOL_ERROR),
    "block interrupted": (headers(1, flags=0) + frame(T.PING, 0, 0, b"\0" * 8), E.PROTOCOL_ERROR),
    "block interrupted by unknown": (headers(1, flags=0) + frame(0x20, 0, 0), E.PROTOCOL_ERROR),
    "CONTINUATION other stream": (headers(1, flags=0) + frame(T.CONTINUATION, END_HEADERS, 3), E.PROTOCOL_ERROR),
    "PUSH_PROMISE": (frame(T.PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2"), E.PROTOCOL_ERROR),
    "lower stream id": (headers(5) + headers(3), E.PROTOCOL_ERROR),
    "HPACK index 0": (frame(T.HEADERS, END_HEADERS, 1, b"\x80"), E.COMPRESSION_ERROR),
    "HPACK index out of range": (frame(T.HEADERS, END_HEADERS, 1, b"\xff\x7f"), E.COMPRESSION_ERROR),
    "HPACK table size over ours": (frame(T.HEADERS, END_HEADERS, 1, b"\x3f\xe1\x3f" + block()), E.COMPRESSION_ERROR),
}


@pytest.mark.parametrize("name", CONNECTION_ERRORS)
def test_connection_errors(name: str) -> None:
    data, code = CONNECTION_ERRORS[name]
    server = raw_server() if name != "invalid preface" else None
    if server is None:
        from edge.h2 import H2Connection

        server = H2Connection()
    events = server.receive_data(data)
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == code
    assert goaway_code(server.data_to_send()) == code
    assert server.receive_data(headers(101)) == []  # nothing more is read


STREAM_ERRORS = {
    "uppercase name": ([*GET, (b"X-Up", b"1")], E.PROTOCOL_ERROR),
    "unknown pseudo": ([*GET, (b":foo", b"1")][::-1], E.PROTOCOL_ERROR),
    "response pseudo": ([(b":status", b"200"), *GET], E.PROTOCOL_ERROR),
    "pseudo after regular": ([*GET[:3], (b"a", b"b"), GET[3]], E.PROTOCOL_ERROR),
    "duplicate :path": ([*GET, (b":path", b"/")], E.PROTOCOL_ERROR),
    "empty :path": ([*GET[:3], (b":path", b"")], E.PROTOCOL_ERROR),
    "no :method": (GET[1:], E.PROTOCOL_ERROR),
    "connection header": ([*GET, (b"connection", b"keep-alive")], E.PROTOCOL_ERROR),
    "transfer-encoding": ([*GET, (b"transfer-encoding", b"chunked")], E.PROTOCOL_ERROR),
    "te gzip": ([*GET, (b"te", b"gzip")], E.PROTOCOL_ERROR),
    "value with LF": ([*GET, (b"x", b"a\nb")], E.PROTOCOL_ERROR),
    "value with leading space": ([*GET, (b"x", b" a")], E.PROTOCOL_ERROR),
    "content-length and no body": ([*GET, (b"content-length", b"3")], E.PROTOCOL_ERROR),
    "bad content-length": ([*GET, (b"content-length", b"3x")], E.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("name", STREAM_ERRORS)
def test_malformed_requests_are_stream_errors(name: str) -> None:
    fields, code = STREAM_ERRORS[name]
    server = raw_server()
    events = server.receive_data(headers(1, fields) + headers(3))
    assert rst_codes(server.data_to_send()) == {1: code}
    assert [type(e) for e in events] == [RequestReceived] and events[0].stream_id == 3  # the connection lives on


def test_te_trailers_is_allowed_and_host_is_kept() -> None:
    server = raw_server()
    (ev,) = server.receive_data(headers(1, [*GET, (b"te", b"trailers"), (b"host", b"a")]))
    assert ev.request.fields == ((b"te", b"trailers"), (b"host", b"a"))


def test_body_longer_than_content_length() -> None:
    server = raw_server()
    server.receive_data(headers(1, [*GET, (b"content-length", b"2")], flags=END_HEADERS))
    events = server.receive_data(frame(T.DATA, 0, 1, b"abc"))
    assert isinstance(events[0], StreamReset) and rst_codes(server.data_to_send()) == {1: E.PROTOCOL_ERROR}


def test_data_after_end_stream_and_after_our_reset() -> None:
    server = raw_server()
    server.receive_data(headers(1) + headers(3, flags=END_HEADERS))
    server.data_to_send()
    server.receive_data(frame(T.DATA, 0, 1, b"x"))  # half-closed (remote): STREAM_CLOSED
    assert rst_codes(server.data_to_send()) == {1: E.STREAM_CLOSED}
    server.reset_stream(3)
    server.data_to_send()
    assert server.receive_data(frame(T.DATA, END_STREAM, 3, b"late")) == []  # in flight: ignored
    assert server.data_to_send() == b""


def test_padding_priority_and_continuation_are_understood() -> None:
    server = raw_server()
    b = block()
    padded = frame(T.HEADERS, PADDED | PRIORITY | END_STREAM, 1, b"\x03" + b"\0\0\0\0\x10" + b[:3] + b"\0\0\0")
    events = server.receive_data(padded + frame(T.CONTINUATION, END_HEADERS, 1, b[3:]))
    assert isinstance(events[0], RequestReceived) and events[0].request.path == b"/"
    events = server.receive_data(frame(T.PRIORITY, 0, 7, b"\0\0\0\1\x10") + frame(0x42, 0xFF, 9, b"ext"))
    assert events == [] and server.data_to_send() == b""  # priority and unknown frames: ignored


def test_self_dependency_is_a_stream_error() -> None:
    server = raw_server()
    server.receive_data(frame(T.PRIORITY, 0, 1, b"\0\0\0\1\x10"))
    assert rst_codes(server.data_to_send()) == {1: E.PROTOCOL_ERROR}


def test_too_many_streams_are_refused() -> None:
    server = raw_server(H2Settings(max_concurrent_streams=2))
    events = server.receive_data(b"".join(headers(sid, flags=END_HEADERS) for sid in (1, 3, 5)))
    assert [e.stream_id for e in events] == [1, 3]
    assert rst_codes(server.data_to_send()) == {5: E.REFUSED_STREAM}


def test_settings_are_acknowledged_and_initial_window_applies() -> None:
    server = raw_server()
    server.receive_data(headers(1))
    server.receive_data(frame(T.SETTINGS, 0, 0, b"\0\x04\0\0\0\x01"))  # INITIAL_WINDOW_SIZE = 1
    assert server.data_to_send() == frame(T.SETTINGS, ACK, 0)
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"abc", end_stream=True)
    out = server.data_to_send()
    assert out.endswith(frame(T.DATA, 0, 1, b"a"))
    server.receive_data(frame(T.WINDOW_UPDATE, 0, 1, b"\0\0\0\x05"))
    assert server.data_to_send() == frame(T.DATA, END_STREAM, 1, b"bc")
    assert server.idle
