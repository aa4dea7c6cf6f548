"""Backend connections and pools: keep-alive reuse, round-robin, passive health.

A ``BackendConnection`` parses one response at a time (httptools/llhttp) and
hands head, body pieces and completion to the ``ResponseSink`` that owns it
for the current exchange. A ``Pool`` per app keeps idle connections per
backend, picks backends round-robin, and skips for a while a backend that
refused a connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol

import httptools

log = logging.getLogger(__name__)

DOWN_FOR = 5.0  # seconds a backend that refused a connection is skipped
# Idle keep-alive connections older than this are not reused: many servers
# close theirs after 5-60 s, and reusing one they just closed costs a retry.
IDLE_REUSE = 30.0


class UpstreamError(Exception):
    """Why an exchange with a backend failed; ``kind`` feeds the answer and metrics."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind  # "refused", "timeout", "reset", "protocol", "closed"


class Batching(Protocol):
    """The client side of the exchange: its writes during one backend read go out together."""

    def batch_begin(self) -> None: ...
    def batch_end(self) -> None: ...


class ResponseSink(Protocol):
    @property
    def downstream(self) -> Batching:
        """Called directly around each backend read (no frame of the sink's in between)."""

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      keep_alive: bool, chunked: bool, content_length: int | None) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self) -> None: ...
    def upstream_failed(self, error: UpstreamError) -> None: ...
    def upstream_pause(self) -> None: ...
    def upstream_resume(self) -> None: ...


# What one read from a backend may bring: reads go into this buffer, shared
# by every backend connection of the process, and are copied out at their
# size. A plain Protocol would read up to 256 KiB per call (uvloop), and a
# stalled client would then hold a whole such read on top of its transport's
# buffers: 100 stalled readers cost +128 MiB of RSS before this bound.
READ_SIZE = 64 * 1024
WRITE_HIGH_WATER = 64 * 1024  # request bytes held for a slow backend before the client is paused
_READ_BUFFER = memoryview(bytearray(READ_SIZE))
# Response fields that say where the body ends (RFC 9112 §6.3), noted as they are parsed.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class BackendConnection(asyncio.BufferedProtocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.idle_since = 0.0
        self.reused = False  # true once it served an exchange: a failure may be a stale keep-alive
        self._paused = False  # reading paused by its owner (back-pressure)
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing: list[tuple[bytes, bytes]] = []  # the head's Content-Length and Transfer-Encoding fields
        self._got_response = False
        self._close_delimited = False  # the body ends with the connection (RFC 9112 §6.3 item 8)
        self._done = False
        self._release = False  # the response ended with keep-alive: pool it once the read is over
        self._excess = False  # bytes came past the end of the response
        self._tunnel = False  # after a 101: bytes flow both ways unparsed

    # --- owner's side -----------------------------------------------------------
    def start(self, sink: ResponseSink, head_only: bool) -> None:
        """Own the connection for one exchange; ``head_only`` for HEAD requests."""
        self.sink = sink
        self._head_only = head_only
        if self._paused:
            # The previous owner paused it (its client was slow) and let it go
            # with its response complete in that same read: a new exchange reads.
            self.resume_reading()
        if self._parser is None:
            # One parser serves every response of a keep-alive connection;
            # only a HEAD answer (no body despite its Content-Length) spends it.
            self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._framing = []
        self._reason = b""
        self._got_response = False
        self._close_delimited = False
        self._done = False

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self.sink = None
        if self.transport is not None:
            # Abort: a backend that never sends close_notify (or a slow one)
            # must not hold the socket open (DESIGN.md).
            self.transport.abort()

    # --- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        # A copy: body pieces are kept in the client's write buffers.
        self.data_received(bytes(_READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            if self.sink is not None:
                self.sink.response_body(data)
            return
        sink = self.sink
        if sink is None or self._parser is None:
            # Bytes on an idle connection: the backend broke the protocol.
            self.close()
            return
        batching = sink.downstream
        batching.batch_begin()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # 101 Switching Protocols: what follows the head belongs to the new protocol.
            rest = data[exc.args[0] :] if exc.args else b""
            if rest and self.sink is not None:
                self.sink.response_body(rest)
        except httptools.HttpParserError as exc:
            if self._done:
                self._excess = True  # garbage after the end of the response
            else:
                self._fail(UpstreamError("protocol", f"bad response from {self.backend}: {exc}"))
        finally:
            batching.batch_end()
            if self._release:
                self._settle()

    def _settle(self) -> None:
        """The response ended with keep-alive and this read is over: pool the
        connection only if nothing came past the end of the message. Extra
        bytes (past a Content-Length, after a 204/304 or a HEAD answer) mean
        the backend and edge disagree on framing: the next request on it would
        read them as its response (RFC 9112 §9.3, response splitting)."""
        self._release = False
        if self._excess:
            log.info("backend %s sent bytes past the end of a response; connection discarded", self.backend)
            self.close()
        elif self.transport is not None and not self.transport.is_closing():
            self.backend.release(self)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.backend.pool_forget(self)
        if self._tunnel:
            self._fail(UpstreamError("closed", f"{self.backend} closed the upgraded connection"))
            return
        if self.sink is not None and not self._done:
            if self._close_delimited and exc is None:
                # A close-delimited body ends with the connection (RFC 9112 §6.3
                # item 8): a clean close, not a reset (an error is a cut body).
                self._finish(False)
            elif self._got_response:
                # Content-Length or chunked, cut short: the message is incomplete
                # (RFC 9112 §8); it must reach the client as an abort.
                self._fail(UpstreamError("closed", f"{self.backend} closed the connection mid-response"))
            else:
                self._fail(UpstreamError("reset", f"{self.backend} closed the connection"))

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume()

    def _fail(self, error: UpstreamError) -> None:
        sink, self.sink = self.sink, None
        self._done = True
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.upstream_failed(error)

    # --- httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:
            self._excess = True  # a second response to one request

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name in _FRAMING:
            self._framing.append((name, value))  # read once the head is complete

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None and self.sink is not None
        status = parser.get_status_code()
        headers, self._headers = self._headers, []
        reason, self._reason = self._reason, b""
        if self._done or self.sink is None:
            self._framing = []
            return  # past the end of the response: noted as excess already
        if status < 200:
            self._framing = []  # an interim response's framing fields say nothing of the final one
        if status == 101:
            self._got_response = True
            self._tunnel = True
            self.sink.response_head(status, reason, headers, False, False, None)
            return
        if 100 <= status < 200:
            # Interim response (100 Continue, 103 Early Hints): pass it on; the
            # final response follows on the same connection (RFC 9110 §15.2).
            self.sink.response_head(status, reason, headers, True, False, None)
            return
        self._got_response = True
        chunked = False
        length: int | None = None
        framing, self._framing = self._framing, []
        for name, value in framing:
            if name == b"transfer-encoding":
                chunked = chunked or value.lower().find(b"chunked") >= 0
            elif value.strip().isdigit():  # content-length
                length = int(value)
        no_body = self._head_only or status == 204 or status == 304
        self._close_delimited = not (chunked or no_body) and length is None
        keep_alive = parser.should_keep_alive()
        self.sink.response_head(status, reason, headers, keep_alive, chunked, length)
        if no_body:
            # No body follows a HEAD, 204 or 304 response (RFC 9110 §6.4.1),
            # whatever Content-Length says: finish now and reset the parser.
            self._finish(keep_alive)

    def on_body(self, body: bytes) -> None:
        if self._done:
            self._excess = True  # a body after a HEAD/204/304 answer
        elif self.sink is not None:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        if not self._got_response or self._done or self._tunnel:
            return  # the end of an interim 1xx response, a HEAD already finished, or a 101
        assert self._parser is not None
        self._finish(self._parser.should_keep_alive())

    def _finish(self, keep_alive: bool) -> None:
        self._done = True
        sink, self.sink = self.sink, None
        if self._head_only:
            self._parser = None
        self.reused = True
        if keep_alive and self.transport is not None and not self.transport.is_closing():
            self._release = True  # pooled by _settle, once the rest of this read is seen
        elif self.transport is not None:
            self.transport.close()
        if sink is not None:
            sink.response_complete()


class Backend:
    """One ``host:port`` and its idle keep-alive connections."""

    def __init__(self, address: str, pool_size: int) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.pool_size = pool_size
        self.idle: deque[BackendConnection] = deque()
        self.down_until = 0.0

    def __str__(self) -> str:
        return self.address

    def release(self, conn: BackendConnection) -> None:
        if len(self.idle) >= self.pool_size:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def pool_forget(self, conn: BackendConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def take_idle(self) -> BackendConnection | None:
        oldest_usable = time.monotonic() - IDLE_REUSE
        while self.idle:
            conn = self.idle.pop()  # most recently used: least likely to have timed out
            if conn.transport is None or conn.transport.is_closing():
                continue
            if conn.idle_since < oldest_usable:
                conn.close()
                continue
            return conn
        return None

    async def connect(self, timeout: float) -> BackendConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: BackendConnection(self), self.host, self.port),
                timeout,
            )
        except TimeoutError:
            raise UpstreamError("timeout", f"connecting to {self} timed out") from None
        except OSError as exc:
            self.down_until = time.monotonic() + DOWN_FOR
            raise UpstreamError("refused", f"{self}: {exc.strerror or exc}") from None
        return conn

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()


class Pool:
    """The backends of one app, picked round-robin among the healthy ones."""

    def __init__(self, backends: tuple[str, ...], pool_size: int) -> None:
        self.backends = [Backend(b, pool_size) for b in backends]
        self._next = 0

    def pick(self) -> Backend:
        """The next healthy backend round-robin; the next one at all when none is.

        The cursor moves past the backend picked, not just one step: stepping
        one and handing a down backend's turn to its neighbour gave that
        neighbour two turns in three ([a, down, b]: b, b, a, ...)."""
        backends = self.backends
        n = len(backends)
        if n == 1:
            return backends[0]  # healthy or not, the only one (most apps have one backend)
        start = self._next
        now = time.monotonic()
        for i in range(n):
            backend = backends[(start + i) % n]
            if backend.down_until <= now:
                self._next = (start + i + 1) % n
                return backend
        self._next = (start + 1) % n
        return backends[start % n]

    def candidates(self, first: Backend | None = None) -> list[Backend]:
        """Every backend to try in turn: ``first``, then the others round-robin,
        healthy ones before those marked down."""
        backends = self.backends
        if not backends:
            return []
        start = backends.index(first) if first is not None else self._next % len(backends)
        ordered = backends[start:] + backends[:start]
        now = time.monotonic()
        healthy = [b for b in ordered if b.down_until <= now]
        return healthy + [b for b in ordered if b.down_until > now]

    def close(self) -> None:
        for backend in self.backends:
            backend.close_idle()
