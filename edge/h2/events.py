"""What ``H2Connection.receive_data`` reports to the code that drives it."""

from __future__ import annotations

from dataclasses import dataclass

from edge.h2.headers import Fields, Request


@dataclass(slots=True)
class RequestReceived:
    stream_id: int
    request: Request
    end_stream: bool


@dataclass(slots=True)
class DataReceived:
    """Body bytes; hand ``len(data)`` to ``ack_data`` once they are passed on (flow control)."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class TrailersReceived:
    stream_id: int
    fields: Fields  # the request ends here (RFC 9113 §8.1)


@dataclass(slots=True)
class StreamReset:
    """The stream is gone: reset by the peer (``remote``) or by us after a stream error."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(slots=True)
class WindowOpened:
    """The peer opened flow-control windows: these streams' queued output shrank."""

    stream_ids: list[int]


@dataclass(slots=True)
class ConnectionTerminated:
    """GOAWAY received (``remote``), or sent by us after a connection error: close
    once ``data_to_send`` is written."""

    error_code: int
    last_stream_id: int
    remote: bool
    reason: str = ""


Event = RequestReceived | DataReceived | TrailersReceived | StreamReset | WindowOpened | ConnectionTerminated
