"""The client side of the data path: an asyncio.Protocol over httptools.

Per connection: the transport, the parser, one timer, the reasons reading is
paused. Per request: an ``Exchange``. Requests are answered in order;
pipelined ones wait in a queue with reading paused so they cannot pile up.
Bodies stream both ways with back-pressure: a slow client pauses the
backend's reads, a slow backend pauses the client's. After a ``101`` the
connection becomes a byte pipe to the backend (WebSocket and other non-HTTP
upgrades; never h2c, see ``h1.forwardable_upgrade``).

Mixins hold the rest: ``forwarding`` (route and send upstream), ``responses``
(what the backend answers), ``answers`` (what edge answers itself).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import httptools

from edge.proxy import h1
from edge.proxy.answers import LocalAnswers
from edge.proxy.controls import count_done
from edge.proxy.errors import HttpError
from edge.proxy.exchange import Exchange, ListenerInfo, ProxyContext, keeps_alive
from edge.proxy.forwarding import RequestSide
from edge.proxy.responses import ResponseSide
from edge.proxy.upstream import BackendConnection, UpstreamError
from edge.tls.acceptor import TlsInfo
from edge.tls.gate import Peer

log = logging.getLogger(__name__)

# Body bytes held while the backend connection is being made; past this the
# client is paused, so a large upload never sits in memory.
_MAX_BUFFERED = 256 * 1024
# What the client transport may hold unsent before the backend is paused.
# asyncio's default high-water mark is 64 KiB too, but explicit: a stalled
# reader must cost little (a backend read is at most this much on top).
WRITE_HIGH_WATER = 64 * 1024

_NOTED = frozenset({b"host", b"connection", b"x-request-id", *h1.FRAMING})


# One read buffer for every client connection of this process. uvloop's TLS
# transport reads into it and ``buffer_updated`` parses it before returning,
# so connections never see each other's bytes. Without it (a plain Protocol)
# each TLS read allocates and shrinks a 256 KiB bytes object: mmap, mremap and
# munmap were 7% of a keep-alive profile. And no per-connection buffer: idle
# connections stay small.
_READ_BUFFER = memoryview(bytearray(64 * 1024))


class HttpProxyProtocol(ResponseSide, RequestSide, LocalAnswers, asyncio.BufferedProtocol):
    def __init__(self, shared: ProxyContext, listener: ListenerInfo, tls: TlsInfo | None,
                 peer: Peer | None = None) -> None:
        self.shared = shared  # what every connection of this process shares (not an SSLContext)
        self.config = shared.config
        self.listener = listener
        self.tls = tls
        # The client when a control named it (PROXY header, limits); None: the socket's peer.
        self.peer = peer if peer is not None or tls is None else tls.peer
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.client_ip = b""
        self.tls_version = ""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the scheduled handle fires
        self._timer_deadline = 0.0
        self._batch: list[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in connection_made
        self._paused: set[str] = set()
        self._writing_paused = False
        self._closing = False
        self._served = 0  # exchanges finished on this connection
        self._response_chunked = False
        # The exchange whose request the parser is reading (the last one begun);
        # it may already be answered (an early 404) while its body still arrives.
        self._parsing: Exchange | None = None
        # Upgrade: bytes the client sent after the head, before the backend's 101.
        self._tunnel: BackendConnection | None = None
        self._tunnel_pending: bytearray | None = None

    # --- connection -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        if self.peer is not None:
            self.client_ip = self.peer.ip
        else:
            peername = transport.get_extra_info("peername")
            self.client_ip = str(peername[0]).encode() if peername else b""
        if self.tls is not None:
            sslobj = transport.get_extra_info("ssl_object")
            self.tls_version = (sslobj.version() or "") if sslobj is not None else ""
        self.shared.connections.add(self)
        # Bounded buffering per connection: above this the backend is paused
        # (pause_writing), so a client that reads nothing holds little.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self._arm(self.config.request_head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self.shared.connections.discard(self)
        if self.peer is not None and self.peer.slot is not None:
            self.peer.slot.release()  # [limits]: the connection's place frees now, not at collection
        for exchange in self.queue:
            if exchange.conn is not None:
                exchange.conn.close()  # the client is gone: nobody to answer
        self.queue.clear()
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_BUFFER[:nbytes])

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
            exchange = self._parsing
            if exchange is not None and exchange.body_apart:
                self._read_body_apart(exchange, bytes(rest))
                return
            self._tunnel_pending = bytearray(rest)  # a copy
            self._pause("upgrade")
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._refuse(cause.status if isinstance(cause, HttpError) else 400)

    def eof_received(self) -> bool | None:
        exchange = self._parsing
        if exchange is not None and exchange.body_expected and not exchange.request_done:
            # The client ended mid-body: the request is incomplete (RFC 9112
            # §8). The backend must not take what it got for a whole body:
            # abort its connection rather than wait for the response timeout.
            if exchange.conn is not None:
                exchange.conn.close()
                exchange.conn = None
            return False
        # A client that half-closes has sent all it will: answer what is in
        # flight (keep the transport open for writing), then close.
        return bool(self.queue) and self.tls is None

    def pause_writing(self) -> None:
        self._writing_paused = True
        conn = self._current_conn()
        if conn is not None:
            conn.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        conn = self._current_conn()
        if conn is not None:
            conn.resume_reading()

    def _current_conn(self) -> BackendConnection | None:
        if self._tunnel is not None:
            return self._tunnel
        return self.queue[0].conn if self.queue else None

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
        self._batch = []

    def batch_end(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self.transport is not None:
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

    # --- one timer per connection; its meaning follows the connection's state ----------
    def _arm(self, delay: float) -> None:
        """Move the deadline. The scheduled handle is kept when the deadline only
        moves later (it re-arms itself when it fires early), so a busy keep-alive
        connection creates no timer per request."""
        loop = self._loop
        deadline = self._timer_deadline = loop.time() + delay
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()  # an earlier deadline than the one scheduled
            self._timer = loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _cancel_timer(self) -> None:
        self._timer_deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._timer_deadline:
            return
        loop = self._loop
        if loop.time() < self._timer_deadline:
            # Pushed back since it was scheduled (activity): sleep until the new deadline.
            self._timer = loop.call_at(self._timer_deadline, self._on_timer)
            self._timer_at = self._timer_deadline
            return
        self._timer_deadline = 0.0
        head = self.queue[0] if self.queue else None
        if head is None:
            self._close()  # idle keep-alive, or a new connection that never spoke
        elif not head.started:
            self._refuse(408)  # the request head is too slow (slowloris)
        elif not head.responded:
            # The backend has not answered in time (RFC 9110 §15.6.5).
            if head.conn is not None:
                head.conn.close()
                head.conn = None
            self._answer_error(head, 504)
        else:
            # The response stalled half way: the client must see it cut short.
            if head.conn is not None:
                head.conn.close()
                head.conn = None
            self._abort_response(head, UpstreamError("timeout", f"backend {head.backend} stalled mid-response"))

    # --- httptools request callbacks -----------------------------------------------------
    def on_message_begin(self) -> None:
        exchange = Exchange()
        self._parsing = exchange
        self.queue.append(exchange)
        if len(self.queue) == 1:
            self._arm(self.config.request_head_timeout)

    def on_url(self, url: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.target += url
        if len(exchange.target) > self.config.max_uri_bytes:
            raise HttpError(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.head_bytes += len(name) + len(value) + 4
        if exchange.head_bytes > self.config.max_header_bytes:
            raise HttpError(431)
        name = name.lower()
        exchange.headers.append((name, value))
        if name in _NOTED:
            if name == b"host":
                exchange.host_header = value
                exchange.host_headers += 1
            elif name == b"connection":
                exchange.has_connection = True
            elif name == b"x-request-id":
                exchange.request_id = value
            else:
                exchange.framing = True

    def on_headers_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        parser = self.parser
        exchange.method = parser.get_method()
        exchange.version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive() and not self.shared.draining
        if exchange.framing:
            exchange.content_length, exchange.chunked = h1.check_framing(exchange.headers)
            exchange.body_expected = exchange.chunked or bool(exchange.content_length)
        if parser.should_upgrade():
            # llhttp reads nothing after this head as HTTP: the connection ends with it.
            exchange.upgrade = True
            if exchange.body_expected:
                # Its body would be taken for bytes of the new protocol, and the
                # switch would happen mid-body: refuse the upgrade, read the body.
                exchange.body_apart = True
            elif exchange.method != b"CONNECT":
                exchange.upgrade_to = h1.forwardable_upgrade(exchange.headers)
        if exchange is self.queue[0]:
            self._start(exchange)
        else:
            # Pipelined behind a request still in flight: stop reading until its turn.
            self._pause("pipeline")

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        if exchange.response_done:
            return  # answered early (an error): the rest of its body is dropped
        if exchange.body is not None:
            exchange.body.append(body)
            exchange.buffered += len(body)
            if exchange.buffered > _MAX_BUFFERED:
                self._pause("buffer")
        elif exchange.conn is not None:
            exchange.conn.write(h1.chunk(body) if exchange.chunked else body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        if exchange.body_apart:
            return  # llhttp's end of an Upgrade request's head; _BodyApart reads the body
        exchange.request_done = True
        if exchange.response_done:
            return
        if exchange.body is None and exchange.conn is not None and exchange.chunked:
            exchange.conn.write(h1.LAST_CHUNK)

    def _finish(self, exchange: Exchange) -> None:
        exchange.response_done = True
        self._served += 1
        seconds = time.monotonic() - exchange.t0
        self.shared.stats.request_done(exchange.status, seconds, exchange.version)
        count_done(exchange.app, self.shared.app_stats, exchange.status, seconds)
        self._log(exchange)
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if exchange.conn is not None:
            exchange.conn.close()
            exchange.conn = None
        if not keeps_alive(exchange, draining=False):
            # Closing mid-body (an early error answer) avoids reading a body
            # nobody wants; after a refused upgrade the parser is spent.
            self._close()
            return
        if self.queue:
            nxt = self.queue[0]
            if nxt.method:  # its head is complete
                self._start(nxt)
            else:
                self._arm(self.config.request_head_timeout)
        else:
            self._arm(self.config.idle_timeout)
        if len(self.queue) <= 1:
            self._resume("pipeline")

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        self.batch_end()  # what is held goes out before the close
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- shutdown ------------------------------------------------------------------------------
    def drain(self) -> None:
        """Shutdown: close now when idle; otherwise after the response in flight."""
        if not self.queue and self._tunnel is None:
            self._close()
