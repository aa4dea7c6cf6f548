"""An ``h2`` (python-hyper) client talking to an ``edge.h2`` server connection in memory."""

from __future__ import annotations

from collections.abc import Iterable

import h2.config
import h2.connection
import h2.events
import pytest

from edge.h2 import H2Connection, H2Settings
from edge.h2 import frames as f
from edge.h2.events import Event

REQUEST = [(":method", "GET"), (":scheme", "https"), (":authority", "a.example"), (":path", "/")]


class Pair:
    """A client (the oracle) and our server; ``pump`` carries bytes both ways."""

    def __init__(self, settings: H2Settings | None = None) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        self.server = H2Connection(settings)
        self.server.initiate()
        self.events: list[Event] = []
        self.client_events: list[h2.events.Event] = []
        self.pump()

    def to_server(self, data: bytes) -> list[Event]:
        events = self.server.receive_data(data)
        self.events += events
        return events

    def pump(self) -> list[Event]:
        new: list[Event] = []
        for _ in range(50):
            out = self.client.data_to_send()
            if out:
                new += self.to_server(out)
            back = self.server.data_to_send()
            if back:
                self.client_events += self.client.receive_data(back)
            if not out and not back:
                break
        return new

    def request(self, sid: int, headers: Iterable[tuple[str, str]] = REQUEST, end: bool = True) -> list[Event]:
        self.client.send_headers(sid, list(headers), end_stream=end)
        return self.pump()

    def client_of(self, kind: type) -> list:
        return [e for e in self.client_events if isinstance(e, kind)]


@pytest.fixture
def pair() -> Pair:
    return Pair()


def raw_server(settings: H2Settings | None = None) -> H2Connection:
    """A server past the preface, for frames written by hand."""
    server = H2Connection(settings)
    server.initiate()
    server.receive_data(f.PREFACE + f.settings([]))
    server.data_to_send()
    return server


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return f.frame_header(len(payload), ftype, flags, sid) + payload


def goaway_code(data: bytes) -> int | None:
    """The error code of the GOAWAY in these bytes, if any."""
    pos = 0
    while pos + 9 <= len(data):
        length, ftype, _, _ = f.parse_header(data, pos)
        if ftype == f.FrameType.GOAWAY:
            return int.from_bytes(data[pos + 13 : pos + 17], "big")
        pos += 9 + length
    return None


def rst_codes(data: bytes) -> dict[int, int]:
    codes = {}
    pos = 0
    while pos + 9 <= len(data):
        length, ftype, _, sid = f.parse_header(data, pos)
        if ftype == f.FrameType.RST_STREAM:
            codes[sid] = int.from_bytes(data[pos + 9 : pos + 13], "big")
        pos += 9 + length
    return codes
