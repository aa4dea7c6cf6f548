"""HTTP/2 error codes (RFC 9113 §7) and the two kinds of error (§5.4)."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class H2ConnectionError(Exception):
    """A connection error (§5.4.1): send GOAWAY with this code, then close."""

    def __init__(self, code: ErrorCode, reason: str = "") -> None:
        super().__init__(reason or code.name)
        self.code = code
        self.reason = reason


class H2StreamError(Exception):
    """A stream error (§5.4.2): send RST_STREAM on this stream; the connection lives on."""

    def __init__(self, stream_id: int, code: ErrorCode, reason: str = "") -> None:
        super().__init__(reason or code.name)
        self.stream_id = stream_id
        self.code = code
        self.reason = reason
