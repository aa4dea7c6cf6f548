"""Stream states (RFC 9113 §5.1) as an enum and a transition table, and what
each stream holds: flow-control windows (§5.2, §6.9) and output waiting for them.

A server never pushes, so the reserved states do not occur; idle is a stream
not yet in the connection's table.
"""

from __future__ import annotations

from collections import deque
from enum import Enum, auto

from edge.h2.headers import Fields


class StreamState(Enum):
    OPEN = auto()
    HALF_CLOSED_REMOTE = auto()  # the client sent END_STREAM; we may still send
    HALF_CLOSED_LOCAL = auto()  # we sent END_STREAM; the client may still send
    CLOSED = auto()


class StreamInput(Enum):
    RECV_END_STREAM = auto()
    SEND_END_STREAM = auto()
    RESET = auto()  # RST_STREAM sent or received


_S, _I = StreamState, StreamInput
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.OPEN, _I.RECV_END_STREAM): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.SEND_END_STREAM): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_END_STREAM): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_END_STREAM): _S.CLOSED,
    (_S.OPEN, _I.RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RESET): _S.CLOSED,
}


class Stream:
    __slots__ = (
        "content_length",
        "end_queued",
        "id",
        "outbound",
        "outbound_len",
        "received",
        "recv_unacked",
        "recv_window",
        "send_window",
        "state",
        "trailers",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.state = StreamState.OPEN
        self.send_window = send_window  # what the client lets us send (§6.9)
        self.recv_window = recv_window  # what the client may still send us
        self.recv_unacked = 0  # consumed, not yet given back with WINDOW_UPDATE
        self.outbound: deque[bytes] = deque()  # DATA waiting for a window
        self.outbound_len = 0
        self.end_queued = False  # END_STREAM goes after the queued output
        self.trailers: Fields | None = None  # encoded when they go out, to keep HPACK in order
        self.content_length: int | None = None  # §8.1.1: DATA must add up to it
        self.received = 0

    def advance(self, event: StreamInput) -> StreamState:
        """Apply an input; an input the table does not allow is a programming error."""
        self.state = TRANSITIONS[(self.state, event)]
        return self.state

    @property
    def remote_open(self) -> bool:
        """The client may still send DATA or trailers."""
        return self.state is StreamState.OPEN or self.state is StreamState.HALF_CLOSED_LOCAL

    @property
    def local_open(self) -> bool:
        return (self.state is StreamState.OPEN or self.state is StreamState.HALF_CLOSED_REMOTE) and not self.end_queued


class ClosedStreams:
    """The last few closed streams (§5.1 "closed"): frames on a stream we reset
    may still be in flight and are ignored; on one closed otherwise they are
    a STREAM_CLOSED error. Bounded: older ones are forgotten."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._reset_by_us: dict[int, bool] = {}

    def add(self, stream_id: int, reset_by_us: bool) -> None:
        memo = self._reset_by_us
        memo[stream_id] = reset_by_us
        if len(memo) > self._size:
            del memo[next(iter(memo))]

    def reset_by_us(self, stream_id: int) -> bool:
        return self._reset_by_us.get(stream_id, False)

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._reset_by_us
