"""The sending side of a connection: frames out, HPACK encoding in wire order,
and DATA held until the peer's flow-control windows allow it (RFC 9113 §5.2, §6.9).

DATA that does not fit a window waits in its stream's queue; the caller sees
how much with ``Stream.outbound_len`` and pauses that stream's source (its
backend) past a threshold, so a client that does not read one stream holds
back only that stream. When windows open, queued DATA goes out round-robin,
one frame per stream per turn.
"""

from __future__ import annotations

from collections.abc import Iterable

from edge.h2 import frames
from edge.h2.encoder import StatelessEncoder
from edge.h2.frames import DEFAULT_WINDOW, MAX_WINDOW, MIN_MAX_FRAME_SIZE, Setting
from edge.h2.streams import Stream


class Sender:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.encoder = StatelessEncoder()
        self.window = DEFAULT_WINDOW  # connection send window (§6.9.1)
        self.initial_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = MIN_MAX_FRAME_SIZE  # the peer's SETTINGS_MAX_FRAME_SIZE
        self.blocked: dict[int, Stream] = {}  # streams with queued output, in arrival order

    def take(self) -> bytes:
        out = self.out
        if not out:
            return b""
        self.out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def headers(self, stream: Stream, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        block = self.encoder.encode(fields)
        self.out.append(frames.header_block(stream.id, block, end_stream, self.max_frame))

    def data(self, stream: Stream, data: bytes, end_stream: bool) -> bool:
        """Send or queue; True when END_STREAM went out now."""
        if data:
            stream.outbound.append(data)
            stream.outbound_len += len(data)
        if end_stream:
            stream.end_queued = True
        if stream.id not in self.blocked:
            return self._drain(stream, None)
        return False

    def _drain(self, stream: Stream, frame_limit: int | None) -> bool:
        """Write what the windows allow (at most ``frame_limit`` frames); True when
        the stream's END_STREAM went out. A stream left with output is ``blocked``."""
        out = self.out
        queue = stream.outbound
        sent = 0
        while queue and (frame_limit is None or sent < frame_limit):
            room = min(self.window, stream.send_window, self.max_frame)
            if room <= 0:
                break
            chunk = queue[0]
            if len(chunk) > room:
                queue[0] = chunk[room:]
                chunk = chunk[:room]
            else:
                queue.popleft()
            n = len(chunk)
            self.window -= n
            stream.send_window -= n
            stream.outbound_len -= n
            last = not queue and stream.end_queued and stream.trailers is None
            out.append(frames.data(stream.id, chunk, last))
            sent += 1
            if last:
                self.blocked.pop(stream.id, None)
                return True
        if queue:
            self.blocked[stream.id] = stream
            return False
        self.blocked.pop(stream.id, None)
        if not stream.end_queued:
            return False
        if stream.trailers is not None:
            block = self.encoder.encode(list(stream.trailers))
            out.append(frames.header_block(stream.id, block, True, self.max_frame))
        else:
            out.append(frames.data(stream.id, b"", True))
        return True

    def flush(self) -> tuple[list[int], list[Stream]]:
        """After a window grew: (streams whose output shrank, streams whose END_STREAM went out)."""
        moved: list[int] = []
        ended: list[Stream] = []
        while self.blocked and self.window > 0:
            progress = False
            for stream in list(self.blocked.values()):
                before = stream.outbound_len
                if self._drain(stream, 1):
                    ended.append(stream)
                if stream.outbound_len != before or stream.id not in self.blocked:
                    progress = True
                    if stream.id not in moved:
                        moved.append(stream.id)
            if not progress:
                break
        return moved, ended

    def discard(self, stream: Stream) -> None:
        """The stream was reset: its queued output is dropped."""
        self.blocked.pop(stream.id, None)
        stream.outbound.clear()
        stream.outbound_len = 0

    def apply_settings(self, pairs: list[tuple[int, int]], streams: Iterable[Stream]) -> bool:
        """The peer's SETTINGS that govern sending (§6.5.2); False when a window overflows."""
        for ident, value in pairs:
            if ident == Setting.HEADER_TABLE_SIZE:
                self.encoder.set_table_size(value)
            elif ident == Setting.INITIAL_WINDOW_SIZE:  # §6.9.2: the change applies to every stream
                delta = value - self.initial_window
                self.initial_window = value
                for stream in streams:
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        return False
            elif ident == Setting.MAX_FRAME_SIZE:
                self.max_frame = value
        return True

    def grow_window(self, increment: int) -> bool:
        """WINDOW_UPDATE on the connection; False when it overflows (§6.9.1)."""
        self.window += increment
        return self.window <= MAX_WINDOW
