"""The client side of an HTTP/1.1 connection: an asyncio.Protocol over httptools.

Per connection: the transport, the parser, one timer, the reasons reading is
paused. Per request a ``Request``, which routes, forwards and answers; this
connection is its ``Downstream``: it writes HTTP/1.1 and decides only the
framing. Requests are answered in order; pipelined ones wait in a queue with
reading paused. Bodies stream both ways with back-pressure. After a ``101``
the connection is a byte pipe to the backend (WebSocket; never h2c).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import httptools

from edge.proxy import h1
from edge.proxy.deadline import DeadlineConnection
from edge.proxy.downstream import keeps_alive
from edge.proxy.errors import HttpError, error_response
from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.proxy.phase import Phase
from edge.proxy.request import Request
from edge.proxy.upgrade import read_body_apart
from edge.proxy.upstream import BackendConnection, UpstreamError
from edge.tls.acceptor import TlsInfo
from edge.tls.gate import Peer

log = logging.getLogger(__name__)

_NOTED = frozenset({b"host", b"connection", b"x-request-id", *h1.FRAMING})
_HEAD = Phase.HEAD
# Batches at least this large are written piece by piece: joining them would copy
# the body once more, and a TLS record holds at most 16 KiB (RFC 8446 §5.1) anyway.
_JOIN_BELOW = 32 * 1024
FIRST_REQUEST_GRACE = 1.0  # seconds a new connection has for its first request once shutdown began


class HttpProxyProtocol(DeadlineConnection):
    def __init__(self, shared: ProxyContext, listener: ListenerInfo, tls: TlsInfo | None,
                 peer: Peer | None = None) -> None:
        super().__init__(shared, listener, tls, peer)
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the scheduled handle fires
        self._timer_deadline = 0.0
        self._batch: list[bytes] | None = None
        self._paused: set[str] = set()
        self._closing = False
        self._response_chunked = False
        self._response_framed = False  # the response in flight says where it ends (length, chunks)
        # The request the parser is reading (the last one begun); it may be
        # answered already (an early 404) while its body still arrives.
        self._parsing: Request | None = None
        self._head_bytes = 0  # of the head being parsed
        self._head_due = False  # a head began in this read: its deadline is armed at the end of the read
        self._framing = False  # a Content-Length or Transfer-Encoding field came in it
        self._body_apart = False  # a refused upgrade whose body a parser of its own reads
        # Upgrade: bytes the client sent after the head, before the backend's 101.
        self._tunnel: BackendConnection | None = None
        self._tunnel_pending: bytearray | None = None

    # --- connection -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(self.config.request_head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        super().connection_lost(exc)
        queue, self.queue = self.queue, deque()
        for req in queue:
            req.client_gone()  # nobody to answer
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        self.transport = None

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the client; ``data`` may be a view of the shared buffer,
        valid only until this returns: whatever is kept is copied."""
        if self._tunnel is not None:
            self._tunnel.write(bytes(data))
            return
        if self._tunnel_pending is not None:
            self._tunnel_pending += data
            return
        try:
            self.parser.feed_data(data)
        except HttpError as exc:
            self._refuse(exc.status)
        except httptools.HttpParserUpgrade as exc:
            # The head of an Upgrade request is parsed; what follows is the new protocol.
            rest = data[exc.args[0] :] if exc.args else b""
            if self._body_apart and self._parsing is not None:
                read_body_apart(self, self._parsing, bytes(rest))
                return
            self._tunnel_pending = bytearray(rest)  # a copy
            self._pause("upgrade")
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._refuse(cause.status if isinstance(cause, HttpError) else 400)
        else:
            if self._head_due:
                # A request head began in these bytes and is not complete: its
                # deadline runs from now (slowloris). One that completed in the
                # same read (the common case) never set a deadline of its own.
                self._head_due = False
                self._arm(self.config.request_head_timeout)

    def eof_received(self) -> bool | None:
        req = self._parsing
        if req is not None and req.body_expected and not req.request_done:
            # The client ended mid-body: the request is incomplete (RFC 9112
            # §8). The backend must not take what it got for a whole body.
            req.client_gone()
            return False
        # A client that half-closes has sent all it will: answer what is in
        # flight (keep the transport open for writing), then close.
        return bool(self.queue) and self.tls is None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._tunnel is not None:
            self._tunnel.pause_reading()
        elif self.queue:
            self.queue[0].hold()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._tunnel is not None:
            self._tunnel.resume_reading()
        elif self.queue:
            self.queue[0].release()

    # --- Downstream: what the request calls -------------------------------------------
    def send_head(self, req: Request, status: int, reason: bytes, headers: h1.Headers,
                  length: int | None, no_body: bool) -> None:
        if self.transport is None:
            return
        if status < 200:
            self._write(h1.response_head(status, reason, headers, content_length=None, chunked=False,
                                         keep_alive=True))
            if status == 101:
                self._open_tunnel(req)
            return
        if no_body or length is not None:
            chunked = False
        elif req.version == "1.1":
            chunked = True
        else:
            chunked = False  # an HTTP/1.0 client cannot read chunked: the body ends with the connection
        keep = req.keep_alive = keeps_alive(req, self.shared.draining,
                                            not (chunked or no_body or length is not None))  # close_delimited
        self._response_chunked = chunked
        self._response_framed = chunked or no_body or length is not None
        head = h1.response_head(status, reason, headers, length, chunked, keep)  # positional: the hot path
        batch = self._batch  # self._write, inline
        if batch is not None:
            batch.append(head)
        else:
            self.transport.write(head)

    def send_body(self, req: Request, data: bytes) -> None:
        if self.transport is None:
            return
        if self._tunnel is None:
            # Activity pushes the stall deadline back; the timer itself is not touched.
            self._timer_deadline = self._loop.time() + self.config.response_timeout
        if self._response_chunked:
            data = h1.chunk(data)
        batch = self._batch  # self._write, inline
        if batch is not None:
            batch.append(data)
        else:
            self.transport.write(data)

    def end(self, req: Request) -> None:
        if self._response_chunked:
            self._write(h1.LAST_CHUNK)
            self._response_chunked = False
        self.served += 1
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        if req.body_held:
            req.release_body()  # a backend that was full is gone
        if not keeps_alive(req, False):  # draining: decided with the head
            # Closing mid-body (an early error answer) avoids reading a body
            # nobody wants; after a refused upgrade the parser is spent.
            self._close()
            return
        if queue:
            nxt = queue[0]
            if nxt.method:  # its head is complete
                nxt.start()
            else:
                self._arm(self.config.request_head_timeout)
        else:
            self._arm(self.config.idle_timeout)
        if len(queue) <= 1 and self._paused:
            self._resume("pipeline")

    def abort(self, req: Request, error: UpstreamError) -> None:
        """The client must see an incomplete message, never a complete one (no
        last-chunk, RFC 9112 §8). With Content-Length or chunked framing, closing
        after what was sent tells it; a close-delimited body cannot tell, so the
        connection is aborted (RST, and no TLS close_notify: RFC 8446 §6.1)."""
        if self._tunnel is not None:
            self._tunnel = None  # the backend ended the upgraded connection
            self._close()
            return
        queue, self.queue = self.queue, deque()
        for other in queue:
            other.client_gone()  # pipelined behind it: never begun
        if self._response_framed:
            self._close()
            return
        self._closing = True
        self._cancel_timer()
        self._batch = None
        if self.transport is not None:
            self.transport.abort()

    def pause(self, req: Request) -> None:
        self._pause("request")

    def resume(self, req: Request) -> None:
        self._resume("request")

    def waiting(self, req: Request) -> None:
        self._arm(self.config.response_timeout)

    def _open_tunnel(self, req: Request) -> None:
        assert self.transport is not None
        self._cancel_timer()
        self.queue.clear()
        conn = self._tunnel = req.conn
        pending, self._tunnel_pending = self._tunnel_pending or b"", None
        if conn is not None and pending:
            conn.write(bytes(pending))
        self._paused.clear()
        self.transport.resume_reading()

    # --- writes: one TLS record and one send per backend read ---------------------------
    def _write(self, data: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def batch_begin(self) -> None:
        """A backend read starts: hold client writes (head, body, last chunk) until
        it ends, then send them as one write (one TLS record, one system call)."""
        if self._batch is None:
            self._batch = []

    def batch_end(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self.transport is not None:
            size = 0
            for piece in batch:  # compiled (mypyc), a few instructions; sum(map(len, ...)) is not
                size += len(piece)
            if size >= _JOIN_BELOW and len(batch) > 1:
                self.transport.writelines(batch)  # several records anyway: no copy of a large body piece
            else:
                self.transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    # --- flow control: reading is paused while any reason holds -----------------------
    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self._closing:
                self.transport.resume_reading()

    # --- the deadline (edge.proxy.deadline): what it means follows the connection's state --
    def _expired(self) -> None:
        head = self.queue[0] if self.queue else None
        if head is None:
            self._close()  # idle keep-alive, or a new connection that never spoke
        elif head.phase is _HEAD:
            self._refuse(408)  # the request head is too slow (slowloris)
        else:
            head.timed_out()  # no answer from the backend (504), or a stalled response (cut)

    # --- httptools request callbacks -----------------------------------------------------
    def on_message_begin(self) -> None:
        req = self._parsing = Request(self)
        self._head_bytes = 0
        self._framing = False
        self.queue.append(req)
        self._head_due = len(self.queue) == 1  # armed at the end of the read if the head is not complete

    def on_url(self, url: bytes) -> None:
        req = self._parsing
        assert req is not None
        req.target += url
        if len(req.target) > self.config.max_uri_bytes:
            raise HttpError(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._parsing
        assert req is not None
        size = self._head_bytes = self._head_bytes + len(name) + len(value) + 4
        if size > self.config.max_header_bytes:
            raise HttpError(431)
        name = name.lower()
        req.headers.append((name, value))
        if name in _NOTED:
            if name == b"host":
                req.host_header = value
                req.host_headers += 1
            elif name == b"connection":
                req.has_connection = True
            elif name == b"x-request-id":
                req.request_id = value
            else:
                self._framing = True

    def on_headers_complete(self) -> None:
        req = self._parsing
        assert req is not None
        self._head_due = False
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        if self._framing:
            req.content_length, req.chunked = h1.check_framing(req.headers)
            req.body_expected = req.chunked or bool(req.content_length)
        if parser.should_upgrade():
            # llhttp reads nothing after this head as HTTP: the connection ends with it.
            req.upgrade = True
            if req.body_expected:
                # Its body would be taken for bytes of the new protocol, and the
                # switch would happen mid-body: refuse the upgrade, read the body.
                self._body_apart = True
            elif req.method != b"CONNECT":
                req.upgrade_to = h1.forwardable_upgrade(req.headers)
        if req is self.queue[0]:
            req.start()
        else:
            # Pipelined behind a request still in flight: stop reading until its turn.
            self._pause("pipeline")

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        assert req is not None
        req.request_body(body)

    def on_message_complete(self) -> None:
        req = self._parsing
        assert req is not None
        if self._body_apart:
            return  # llhttp's end of an Upgrade request's head; BodyApart reads the body
        req.request_end()

    def body_apart_done(self) -> None:
        self._pause("upgrade")  # the refused upgrade's body is read; nothing after it is
        self._body_apart = False
        self.on_message_complete()

    def _refuse(self, status: int) -> None:
        """A malformed or too slow request: answer and close (the stream cannot be trusted)."""
        if self.transport is None:
            return
        queue, self.queue = self.queue, deque()
        for req in queue:
            req.client_gone()
        self._write(error_response(status, keep_alive=False))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        self.batch_end()  # what is held goes out before the close
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- shutdown ------------------------------------------------------------------------------
    def drain(self) -> None:
        """Shutdown: close when idle, else after the response in flight. A new connection
        gets a moment for its first request (likely on its way; closing it unread fails it)."""
        if self.queue or self._tunnel is not None:
            return
        if self.served:
            self._close()
        else:
            self._arm(min(self.config.request_head_timeout, FIRST_REQUEST_GRACE))
