"""An HTTP/2 server connection (RFC 9113), sans I/O: bytes in, events out, bytes to send.

Frames are cut by slicing, checked (``frames``), applied to connection and
stream state (``streams``); header blocks are decoded in arrival order
(``headers``). A stream error resets its stream; a connection error sends GOAWAY (§5.4).
Floods: frames that make work without progress (PING, SETTINGS, PRIORITY,
empty DATA or CONTINUATION, streams reset before their answer: CVE-2023-44487)
cost a point each, an answer earns one back; past ``glitch_budget`` the
connection ends with ENHANCE_YOUR_CALM. Header blocks are bounded (CVE-2024-27316).
"""

from __future__ import annotations

from enum import Enum, auto

from edge.h2 import events as ev
from edge.h2 import frames
from edge.h2.errors import ErrorCode, H2ConnectionError, H2StreamError
from edge.h2.frames import DEFAULT_WINDOW, MAX_WINDOW, FrameType, Setting
from edge.h2.headers import HeaderDecoder, check_trailers
from edge.h2.sender import Sender
from edge.h2.settings import H2Settings
from edge.h2.streams import ClosedStreams, Stream, StreamInput, StreamState

_FT = FrameType


class ConnState(Enum):
    PREFACE = auto()  # waiting for the client preface and its SETTINGS (§3.4)
    OPEN = auto()
    DRAINING = auto()  # GOAWAY sent: streams in flight finish, no new ones
    CLOSED = auto()  # connection error or GOAWAY received with nothing left


class H2Connection:
    def __init__(self, settings: H2Settings | None = None) -> None:
        self.settings = s = settings or H2Settings()
        self.state = ConnState.PREFACE
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0  # highest client stream id seen (§5.1.1, §6.8)
        self.glitches = 0
        self._closed = ClosedStreams()
        self._buf = bytearray()
        self._preface_seen = False
        self._decoder = HeaderDecoder(s.max_header_list_size, s.hard_header_list_size)
        self._sender = Sender()
        self._recv_window = s.connection_window
        self._recv_unacked = 0
        self._blocks = frames.BlockAssembler(s.max_header_block)
        self._events: list[ev.Event] = []
        # One handler per frame type of §6, named after it: _on_data, _on_headers...
        self._handlers = {t.value: getattr(self, f"_on_{t.name.lower()}") for t in FrameType}

    # --- start and input -----------------------------------------------------------
    def initiate(self) -> None:
        """Our SETTINGS (§3.4: the server preface) and the connection window."""
        s = self.settings
        pairs: list[tuple[int, int]] = [
            (Setting.MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
            (Setting.ENABLE_PUSH, 0),
            (Setting.MAX_HEADER_LIST_SIZE, s.max_header_list_size),
        ]
        if s.initial_window_size != DEFAULT_WINDOW:
            pairs.append((Setting.INITIAL_WINDOW_SIZE, s.initial_window_size))
        if s.max_frame_size != frames.MIN_MAX_FRAME_SIZE:
            pairs.append((Setting.MAX_FRAME_SIZE, s.max_frame_size))
        # No SETTINGS_ENABLE_CONNECT_PROTOCOL: WebSocket stays on HTTP/1.1 (RFC 8441 §3).
        self._sender.out.append(frames.settings(pairs))
        if s.connection_window > DEFAULT_WINDOW:
            self._sender.out.append(frames.window_update(0, s.connection_window - DEFAULT_WINDOW))

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Feed bytes read from the client; ``data`` is not kept past the call."""
        events: list[ev.Event] = []
        self._events = events
        if self.state is ConnState.CLOSED:
            return events
        buf = self._buf
        if buf:
            buf += data
            data = buf
        try:
            pos = self._read_frames(data, self._read_preface(data) if not self._preface_seen else 0)
        except H2ConnectionError as exc:
            self._connection_error(exc)
            return events
        if pos < len(data):
            self._buf = bytearray(data[pos:])  # a partial frame: copied, ``data`` may be a shared buffer
        elif buf:
            self._buf = bytearray()
        return events

    def _read_preface(self, data: bytes | bytearray | memoryview) -> int:
        """Where frames start, or len(data) while the preface (§3.4) is incomplete."""
        n = min(len(data), len(frames.PREFACE))
        if bytes(data[:n]) != frames.PREFACE[:n]:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
        self._preface_seen = n == len(frames.PREFACE)
        return n if self._preface_seen else 0

    def _read_frames(self, data: bytes | bytearray | memoryview, pos: int) -> int:
        if not self._preface_seen:
            return 0  # keep all until the preface is complete
        n = len(data)
        limit = self.settings.max_frame_size
        while n - pos >= frames.HEADER_LEN and self.state is not ConnState.CLOSED:
            length, ftype, flags, sid = frames.parse_header(data, pos)
            if length > limit:
                raise H2ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
            if self.state is ConnState.PREFACE and ftype != _FT.SETTINGS:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "the preface must end with SETTINGS")
            end = pos + frames.HEADER_LEN + length
            if end > n:
                break
            payload = bytes(data[pos + frames.HEADER_LEN : end])
            pos = end
            self._frame(ftype, flags, sid, payload)
        return pos

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._blocks.pending is not None and ftype != _FT.CONTINUATION:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "header block interrupted")  # §6.2, §6.10
        handler = self._handlers.get(ftype)  # type: ignore[call-overload]
        if handler is None:
            return  # unknown frame types are ignored (§5.5)
        try:
            handler(flags, sid, payload)
        except H2StreamError as exc:
            self._stream_error(exc)

    # --- errors and floods ---------------------------------------------------------
    def _glitch(self) -> None:
        self.glitches += 1
        if self.glitches > self.settings.glitch_budget:
            raise H2ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "too many frames without progress")

    def _connection_error(self, exc: H2ConnectionError) -> None:
        self._sender.out.append(frames.goaway(self.last_stream_id, exc.code, exc.reason.encode()[:256]))
        self.state = ConnState.CLOSED
        self._events.append(ev.ConnectionTerminated(exc.code, self.last_stream_id, False, exc.reason))

    def _stream_error(self, exc: H2StreamError, notify: bool = True) -> None:
        self._sender.out.append(frames.rst_stream(exc.stream_id, exc.code))
        stream = self.streams.pop(exc.stream_id, None)
        self._closed.add(exc.stream_id, True)
        if stream is not None:
            self._sender.discard(stream)
            stream.advance(StreamInput.RESET)
            if notify:
                self._events.append(ev.StreamReset(exc.stream_id, exc.code, False))

    def _idle(self, sid: int) -> bool:
        """Never opened: past the last client stream, or even (we never push, §5.1.1)."""
        return sid > self.last_stream_id or sid % 2 == 0

    def _closed_stream(self, sid: int, what: str) -> None:
        """A frame for a stream that is not open: idle (§5.1: PROTOCOL_ERROR) or closed."""
        if self._idle(sid):
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"{what} on an idle stream")
        if not self._closed.reset_by_us(sid):
            raise H2ConnectionError(ErrorCode.STREAM_CLOSED, f"{what} on a closed stream")

    def _end_local(self, stream: Stream) -> None:
        if stream.advance(StreamInput.SEND_END_STREAM) is StreamState.CLOSED:
            self._forget(stream)
        if self.glitches:
            self.glitches -= 1  # an answered request earns back a point

    def _end_remote(self, stream: Stream) -> None:
        if stream.advance(StreamInput.RECV_END_STREAM) is StreamState.CLOSED:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self._closed.add(stream.id, False)

    # --- frames received (§6) --------------------------------------------------------
    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not payload:
            self._glitch()
        done = self._blocks.headers(sid, flags, payload)
        if done is not None:
            self._headers_complete(sid, done[0], done[1])

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not payload:
            self._glitch()
        done = self._blocks.continuation(sid, flags, payload)
        if done is not None:
            self._headers_complete(sid, done[0], done[1])

    def _headers_complete(self, sid: int, flags: int, block: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            self._new_stream(sid, flags, block)
            return
        fields = self._decoder.decode(block)  # always: the HPACK table must stay in step
        if not stream.remote_open:
            raise H2StreamError(sid, ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM")  # §5.1
        if flags & frames.SELF_DEPENDENT:
            raise H2StreamError(sid, ErrorCode.PROTOCOL_ERROR, "stream depends on itself")
        if not flags & frames.END_STREAM:
            raise H2StreamError(sid, ErrorCode.PROTOCOL_ERROR, "trailers without END_STREAM")  # §8.1
        trailers = check_trailers(sid, fields)
        if stream.content_length is not None and stream.received != stream.content_length:
            raise H2StreamError(sid, ErrorCode.PROTOCOL_ERROR, "body length differs from content-length")
        self._events.append(ev.TrailersReceived(sid, trailers))
        self._end_remote(stream)

    def _new_stream(self, sid: int, flags: int, block: bytes) -> None:
        if sid <= self.last_stream_id:
            self._decoder.decode(block)
            if self._closed.reset_by_us(sid):
                return  # in flight when we reset it
            if sid in self._closed:
                raise H2ConnectionError(ErrorCode.STREAM_CLOSED, "HEADERS on a closed stream")  # §5.1
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "stream id lower than a previous one")  # §5.1.1
        self.last_stream_id = sid
        if self.state is ConnState.DRAINING:
            self._decoder.decode(block)
            return  # after GOAWAY, new streams are ignored (§6.8)
        request = self._decoder.request(sid, block)
        if flags & frames.SELF_DEPENDENT:
            raise H2StreamError(sid, ErrorCode.PROTOCOL_ERROR, "stream depends on itself")
        if len(self.streams) >= self.settings.max_concurrent_streams:
            raise H2StreamError(sid, ErrorCode.REFUSED_STREAM, "too many streams")  # §5.1.2
        end = bool(flags & frames.END_STREAM)
        if end and request.content_length:
            raise H2StreamError(sid, ErrorCode.PROTOCOL_ERROR, "content-length without a body")  # §8.1.1
        stream = Stream(sid, self._sender.initial_window, self.settings.initial_window_size)
        stream.content_length = request.content_length
        self.streams[sid] = stream
        self._events.append(ev.RequestReceived(sid, request, end))
        if end:
            stream.advance(StreamInput.RECV_END_STREAM)

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")  # §6.1
        flow = len(payload)
        self._recv_window -= flow
        if self._recv_window < 0:
            raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._give_back_connection(flow)  # bounded by the stream windows below
        body = frames.strip_padding(payload, flags)
        end = bool(flags & frames.END_STREAM)
        if not body and not end:
            self._glitch()
        stream = self.streams.get(sid)
        if stream is None:
            self._closed_stream(sid, "DATA")
            return
        if not stream.remote_open:
            raise H2StreamError(sid, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")  # §5.1
        stream.recv_window -= flow
        if stream.recv_window < 0:
            raise H2StreamError(sid, ErrorCode.FLOW_CONTROL_ERROR, "stream window exceeded")
        stream.recv_unacked += flow - len(body)  # padding is given back at once
        stream.received += len(body)
        length = stream.content_length
        if length is not None and (stream.received > length or (end and stream.received != length)):
            raise H2StreamError(sid, ErrorCode.PROTOCOL_ERROR, "body length differs from content-length")
        self._events.append(ev.DataReceived(sid, body, end))
        if end:
            self._end_remote(stream)

    def _give_back_connection(self, n: int) -> None:
        self._recv_unacked += n
        if self._recv_unacked >= self.settings.connection_window // 2:
            self._sender.out.append(frames.window_update(0, self._recv_unacked))
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0

    def _on_priority(self, flags: int, sid: int, payload: bytes) -> None:
        self._glitch()
        frames.check_priority(sid, payload)  # and otherwise ignored (RFC 9218 §2.1)

    def _on_rst_stream(self, flags: int, sid: int, payload: bytes) -> None:
        code = frames.parse_rst_stream(sid, payload)
        stream = self.streams.pop(sid, None)
        if stream is None:
            if self._idle(sid):
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")  # §6.4
            return  # closed: ignored (§5.1)
        if stream.local_open:
            self._glitch()  # reset before its answer: the rapid-reset pattern (CVE-2023-44487)
        stream.advance(StreamInput.RESET)
        self._sender.discard(stream)
        self._closed.add(sid, False)
        self._events.append(ev.StreamReset(sid, code, True))

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        pairs = frames.parse_settings(sid, flags, payload)
        if flags & frames.ACK:
            return
        self._glitch()
        sender = self._sender
        if not sender.apply_settings(pairs, self.streams.values()):
            raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "a stream window over 2^31-1")  # §6.9.2
        sender.out.append(frames.SETTINGS_ACK)
        if self.state is ConnState.PREFACE:
            self.state = ConnState.OPEN
        self._flush()

    def _on_push_promise(self, flags: int, sid: int, payload: bytes) -> None:
        raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")  # §8.4

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        frames.check_ping(sid, payload)
        if not flags & frames.ACK:
            self._glitch()
            self._sender.out.append(frames.ping_ack(payload))

    def _on_goaway(self, flags: int, sid: int, payload: bytes) -> None:
        last, code, _debug = frames.parse_goaway(sid, payload)
        if self.state is not ConnState.CLOSED:
            self.state = ConnState.DRAINING
        self._events.append(ev.ConnectionTerminated(code, last, True))

    def _on_window_update(self, flags: int, sid: int, payload: bytes) -> None:
        if sid and sid not in self.streams and self._idle(sid):
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")  # §5.1
        increment = frames.parse_window_update(sid, payload)
        if sid == 0:
            if not self._sender.grow_window(increment):
                raise H2ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            stream = self.streams.get(sid)
            if stream is None:
                return  # closed: ignored (§5.1)
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                raise H2StreamError(sid, ErrorCode.FLOW_CONTROL_ERROR, "stream window over 2^31-1")
        self._flush()

    def _flush(self) -> None:
        if not self._sender.blocked:
            return
        moved, ended = self._sender.flush()
        for stream in ended:
            self._end_local(stream)
        if moved:
            self._events.append(ev.WindowOpened(moved))

    # --- the application's side ------------------------------------------------------
    def data_to_send(self) -> bytes:
        return self._sender.take()

    def send_headers(self, sid: int, fields: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        """A response head; header names must be lower case (§8.2)."""
        stream = self.streams[sid]
        self._sender.headers(stream, fields, end_stream)
        if end_stream:
            self._end_local(stream)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """Send now or queue behind the flow-control windows (see ``buffered``)."""
        stream = self.streams[sid]
        if self._sender.data(stream, data, end_stream):
            self._end_local(stream)

    def send_trailers(self, sid: int, fields: list[tuple[bytes, bytes]]) -> None:
        stream = self.streams[sid]
        stream.trailers = tuple(fields)
        self.send_data(sid, b"", True)

    def buffered(self, sid: int) -> int:
        """Response bytes of this stream waiting for a window."""
        stream = self.streams.get(sid)
        return stream.outbound_len if stream is not None else 0

    def ack_data(self, sid: int, n: int) -> None:
        """``n`` body bytes of this stream were passed on: let the client send more (§6.9)."""
        stream = self.streams.get(sid)
        if stream is None or not stream.remote_open:
            return
        stream.recv_unacked += n
        if stream.recv_unacked >= self.settings.initial_window_size // 2:
            self._sender.out.append(frames.window_update(sid, stream.recv_unacked))
            stream.recv_window += stream.recv_unacked
            stream.recv_unacked = 0

    def reset_stream(self, sid: int, code: ErrorCode = ErrorCode.CANCEL) -> None:
        if sid in self.streams:
            self._stream_error(H2StreamError(sid, code), notify=False)

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """GOAWAY with the last stream id (§6.8): streams up to it finish, none start."""
        if self.state is ConnState.CLOSED or self.state is ConnState.DRAINING:
            return
        self._sender.out.append(frames.goaway(self.last_stream_id, code, debug))
        self.state = ConnState.DRAINING if code == ErrorCode.NO_ERROR else ConnState.CLOSED

    @property
    def idle(self) -> bool:
        return not self.streams
