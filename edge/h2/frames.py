"""HTTP/2 frames (RFC 9113 §4 and §6): the 9-octet header, payload checks, serialising.

Parsing is by slicing; each ``parse_*`` function checks what §6 says about
that frame's length, stream identifier and padding, and raises the error the
RFC names. What depends on stream state is checked in ``connection``.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from edge.h2.errors import ErrorCode, H2ConnectionError, H2StreamError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # §3.4
HEADER_LEN = 9
_HEADER = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, R + stream id
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")

MAX_WINDOW = 2**31 - 1  # §6.9.1
DEFAULT_WINDOW = 65_535  # §6.9.2
MIN_MAX_FRAME_SIZE = 16_384  # §6.5.2
MAX_MAX_FRAME_SIZE = 2**24 - 1


class FrameType(IntEnum):  # §6
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


# Flags (§6); one bit may mean different things on different frame types.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY = 0x20


class Setting(IntEnum):  # §6.5.2
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id)


def parse_header(buf: bytes | bytearray | memoryview, offset: int) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id); the reserved bit is ignored (§4.1)."""
    hi, lo, ftype, flags, sid = _HEADER.unpack_from(buf, offset)
    return (hi << 16) | lo, ftype, flags, sid & 0x7FFFFFFF


# --- payloads received ----------------------------------------------------------------


def strip_padding(payload: bytes, flags: int) -> bytes:
    """§6.1, §6.2: a Pad Length at or past the payload's end is a connection PROTOCOL_ERROR."""
    if not flags & PADDED:
        return payload
    if not payload:
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding longer than the payload")
    return payload[1 : len(payload) - pad]


def check_priority(stream_id: int, payload: bytes) -> None:
    """PRIORITY (§6.3): stream 0 is a connection error; a length other than 5 a stream error."""
    if stream_id == 0:
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
    if len(payload) != 5:
        raise H2StreamError(stream_id, ErrorCode.FRAME_SIZE_ERROR, "PRIORITY length is not 5")
    if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
        raise H2StreamError(stream_id, ErrorCode.PROTOCOL_ERROR, "stream depends on itself")


def parse_rst_stream(stream_id: int, payload: bytes) -> int:
    """RST_STREAM (§6.4): the error code; an unknown code is kept as a number (§7)."""
    if stream_id == 0:
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
    if len(payload) != 4:
        raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length is not 4")
    return _U32.unpack(payload)[0]


def parse_settings(stream_id: int, flags: int, payload: bytes) -> list[tuple[int, int]]:
    """SETTINGS (§6.5): (identifier, value) pairs, each value checked (§6.5.2);
    unknown identifiers are passed on for the caller to ignore."""
    if stream_id != 0:
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
    if flags & ACK:
        if payload:
            raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
        return []
    if len(payload) % 6:
        raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    pairs = [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]
    for ident, value in pairs:
        if ident == Setting.ENABLE_PUSH and value > 1:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH is not 0 or 1")
        if ident == Setting.INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2^31-1")
        if ident == Setting.MAX_FRAME_SIZE and not MIN_MAX_FRAME_SIZE <= value <= MAX_MAX_FRAME_SIZE:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
    return pairs


def check_ping(stream_id: int, payload: bytes) -> None:
    """PING (§6.7)."""
    if stream_id != 0:
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
    if len(payload) != 8:
        raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING length is not 8")


def parse_goaway(stream_id: int, payload: bytes) -> tuple[int, int, bytes]:
    """GOAWAY (§6.8): last stream id, error code, debug data."""
    if stream_id != 0:
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
    if len(payload) < 8:
        raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 octets")
    last, code = _GOAWAY.unpack_from(payload)
    return last & 0x7FFFFFFF, code, payload[8:]


def parse_window_update(stream_id: int, payload: bytes) -> int:
    """WINDOW_UPDATE (§6.9): a zero increment is a stream error on a stream and
    a connection error on the connection."""
    if len(payload) != 4:
        raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length is not 4")
    increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
    if increment == 0:
        if stream_id == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
        raise H2StreamError(stream_id, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
    return increment


# --- frames sent ----------------------------------------------------------------------


def settings(pairs: list[tuple[int, int]]) -> bytes:
    body = b"".join(_SETTING.pack(k, v) for k, v in pairs)
    return frame_header(len(body), FrameType.SETTINGS, 0, 0) + body


SETTINGS_ACK = frame_header(0, FrameType.SETTINGS, ACK, 0)


def ping_ack(opaque: bytes) -> bytes:
    return frame_header(8, FrameType.PING, ACK, 0) + opaque


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame_header(8 + len(debug), FrameType.GOAWAY, 0, 0) + _GOAWAY.pack(last_stream_id, code) + debug


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame_header(4, FrameType.RST_STREAM, 0, stream_id) + _U32.pack(code)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame_header(4, FrameType.WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def data(stream_id: int, payload: bytes, end_stream: bool) -> bytes:
    return frame_header(len(payload), FrameType.DATA, END_STREAM if end_stream else 0, stream_id) + payload


def header_block(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS, then CONTINUATION frames if the block exceeds the peer's frame size (§6.10)."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame_header(len(block), FrameType.HEADERS, flags | END_HEADERS, stream_id) + block
    parts = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    out = [frame_header(len(parts[0]), FrameType.HEADERS, flags, stream_id), parts[0]]
    for n, part in enumerate(parts[1:], 2):
        last = END_HEADERS if n == len(parts) else 0
        out += [frame_header(len(part), FrameType.CONTINUATION, last, stream_id), part]
    return b"".join(out)


SELF_DEPENDENT = 0x100  # not a wire flag: marks HEADERS whose priority names its own stream (§5.3.1)


class BlockAssembler:
    """HEADERS then CONTINUATION frames into one header block (§4.3, §6.2, §6.10).
    The block is bounded in size and in frames whatever the frames carry
    (the CONTINUATION flood, CVE-2024-27316)."""

    def __init__(self, max_block: int, max_frames: int = 256) -> None:
        self.max_block = max_block
        self.max_frames = max_frames
        self.pending: tuple[int, int, list[bytes], int] | None = None  # sid, flags, parts, size

    def headers(self, sid: int, flags: int, payload: bytes) -> tuple[int, bytes] | None:
        """(flags, the whole block) when END_HEADERS is set, else None (CONTINUATION follows)."""
        if sid == 0 or sid % 2 == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0 or an even stream")  # §5.1.1
        block = strip_padding(payload, flags)
        if flags & PRIORITY:  # 5 octets read and ignored (RFC 9218 §2.1)
            if len(block) < 5:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if _U32.unpack_from(block)[0] & 0x7FFFFFFF == sid:
                flags |= SELF_DEPENDENT  # the block is decoded all the same, then the stream reset
            block = block[5:]
        if flags & END_HEADERS:
            return flags, block
        self.pending = (sid, flags, [block], len(block))
        return None

    def continuation(self, sid: int, flags: int, payload: bytes) -> tuple[int, bytes] | None:
        """(flags of the HEADERS frame, the block) on END_HEADERS, else None."""
        pending = self.pending
        if pending is None or pending[0] != sid:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        _, first_flags, parts, size = pending
        size += len(payload)
        if size > self.max_block or len(parts) >= self.max_frames:
            raise H2ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        parts.append(payload)
        if flags & END_HEADERS:
            self.pending = None
            return first_flags, b"".join(parts)
        self.pending = (sid, first_flags, parts, size)
        return None
