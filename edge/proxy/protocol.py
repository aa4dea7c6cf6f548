"""The client side of the data path: an asyncio.Protocol over httptools.

Per connection: the transport, the parser, one timer, the reasons reading is
paused. Per request: an ``Exchange``. Requests are answered in order;
pipelined ones wait in a queue with reading paused so they cannot pile up.
Bodies stream both ways with back-pressure: a slow client pauses the
backend's reads, a slow backend pauses the client's. After a ``101`` the
connection becomes a byte pipe to the backend (WebSocket and other upgrades).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import httptools

from edge.proxy import h1
from edge.proxy.errors import HttpError, error_response
from edge.proxy.exchange import Exchange, ListenerInfo, ProxyContext, log_access
from edge.proxy.responses import STATUS_FOR, ResponseSide
from edge.proxy.upstream import Backend, BackendConnection, Pool, UpstreamError
from edge.tls import names
from edge.tls.acceptor import TlsInfo

log = logging.getLogger(__name__)

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
# Body bytes held while the backend connection is being made; past this the
# client is paused, so a large upload never sits in memory.
_MAX_BUFFERED = 256 * 1024
# Request ids: a random per-process prefix and a counter. Unique across a
# fleet without a system call per request (os.urandom costs one).
_REQUEST_ID_PREFIX = os.urandom(8).hex().encode()
_request_counter = itertools.count(1)


_NOTED = frozenset({b"host", b"connection", b"x-request-id", *h1.FRAMING})


def _next_request_id() -> bytes:
    return b"%b%016x" % (_REQUEST_ID_PREFIX, next(_request_counter))


# One read buffer for every client connection of this process. uvloop's TLS
# transport reads into it and ``buffer_updated`` parses it before returning,
# so connections never see each other's bytes. Without it (a plain Protocol)
# each TLS read allocates and shrinks a 256 KiB bytes object: mmap, mremap and
# munmap were 7% of a keep-alive profile. And no per-connection buffer: idle
# connections stay small.
_READ_BUFFER = memoryview(bytearray(64 * 1024))


class HttpProxyProtocol(ResponseSide, asyncio.BufferedProtocol):
    def __init__(self, ctx: ProxyContext, listener: ListenerInfo, tls: TlsInfo | None) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.listener = listener
        self.tls = tls
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
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode() if peer else b""
        if self.tls is not None:
            sslobj = transport.get_extra_info("ssl_object")
            self.tls_version = (sslobj.version() or "") if sslobj is not None else ""
        self.ctx.connections.add(self)
        self._arm(self.config.request_head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self.ctx.connections.discard(self)
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
            self._tunnel_pending = bytearray(data[exc.args[0] :] if exc.args else b"")  # a copy
            self._pause("upgrade")
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._refuse(cause.status if isinstance(cause, HttpError) else 400)

    def eof_received(self) -> bool | None:
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
            # The response stalled half way: nothing to say, close.
            log.info("backend %s stalled mid-response; closing", head.backend)
            self._close()

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
        exchange.keep_alive = parser.should_keep_alive() and not self.ctx.draining
        if exchange.framing:
            exchange.content_length, exchange.chunked = h1.check_framing(exchange.headers)
            exchange.body_expected = exchange.chunked or bool(exchange.content_length)
        exchange.upgrade = parser.should_upgrade()
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
        exchange.request_done = True
        if exchange.response_done:
            return
        if exchange.body is None and exchange.conn is not None and exchange.chunked:
            exchange.conn.write(h1.LAST_CHUNK)

    # --- routing -----------------------------------------------------------------------
    def _host(self, exchange: Exchange) -> str | None:
        if exchange.host_headers > 1:
            raise HttpError(400, "several Host headers")  # RFC 9112 §3.2
        raw = exchange.host_header
        if exchange.target[:1] != b"/" and exchange.target != b"*":
            # absolute-form: the target's authority wins over Host (RFC 9112 §3.2.2)
            try:
                url = httptools.parse_url(exchange.target)
            except httptools.HttpParserInvalidURLError:
                raise HttpError(400, "invalid request target") from None
            if url.host:
                raw = url.host
                exchange.target = (url.path or b"/") + (b"?" + url.query if url.query else b"")
        if raw is None:
            if exchange.version == "1.1":
                raise HttpError(400, "no Host header")  # RFC 9112 §3.2
            return self.tls.server_name if self.tls is not None else None
        host = raw.strip()
        if host.startswith(b"["):
            return None  # an IP literal names no app
        if b":" in host:
            host, _, port = host.rpartition(b":")
            if not port.isdigit():
                raise HttpError(400, "invalid Host port")
        return names.normalize(host)

    def _start(self, exchange: Exchange) -> None:
        exchange.started = True
        try:
            host = self._host(exchange)
        except HttpError as exc:
            self._answer_error(exchange, exc.status)
            return
        exchange.host = host or ""
        if self.tls is None and exchange.target.startswith(_CHALLENGE_PREFIX) and self.ctx.challenge is not None:
            self._spawn(self._answer_challenge(exchange))
            return
        if host is None:
            self._answer_error(exchange, 404)
            return
        router = self.ctx.router
        sni = self.tls.server_name if self.tls is not None else None
        if sni is not None and not router.same_certificate(sni, host):
            self._answer_error(exchange, 421)
            return
        app = router.app_for(host)
        if app is None:
            # Still loading the store at start: the name may not be read yet (try again soon).
            self._answer_error(exchange, 503 if router.index.loading else 404)
            return
        if self.tls is None and app.force_https:
            self._redirect(exchange, host)
            return
        pool = router.pool_for(app)
        if not pool.backends:
            self._answer_error(exchange, 503)
            return
        new_request_id = None
        if not exchange.request_id:
            exchange.request_id = new_request_id = _next_request_id()
        upgrade = None
        if exchange.upgrade:
            upgrade = next((v for n, v in exchange.headers if n == b"upgrade"), None)
        head = h1.request_head(
            exchange.method,
            exchange.target,
            exchange.headers,
            host=host.encode() if exchange.host_header is None else None,
            client_ip=self.client_ip,
            proto=self.listener.scheme,
            port=self.listener.port,
            request_id=new_request_id,
            content_length=exchange.content_length,
            chunked=exchange.chunked,
            upgrade=upgrade,
            has_connection=exchange.has_connection,
        )
        # Idempotent requests without a body may be sent again on a fresh
        # connection when a reused one turns out dead (RFC 9110 §9.2.2).
        if exchange.method in IDEMPOTENT and not exchange.body_expected and not exchange.upgrade:
            exchange.retry_head = head
        self._dispatch(exchange, pool, head)

    def _dispatch(self, exchange: Exchange, pool: Pool, head: bytes) -> None:
        """Send on an idle pooled connection now when the chosen backend has one
        (the common keep-alive case: no task, no await); else connect in a task."""
        backend = pool.pick()
        conn = backend.take_idle()
        if conn is not None:
            exchange.backend = backend.address
            self._attach(exchange, conn, head)
        else:
            self._spawn(self._forward(exchange, pool.candidates(first=backend), head))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # The loop holds tasks weakly: keep a reference until each is done.
        task = asyncio.get_running_loop().create_task(coro)
        tasks = self.ctx.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _forward(self, exchange: Exchange, candidates: list[Backend], head: bytes) -> None:
        conn: BackendConnection | None = None
        error: UpstreamError | None = None
        for backend in candidates:
            conn = backend.take_idle()
            if conn is None:
                try:
                    conn = await backend.connect(self.config.connect_timeout)
                except UpstreamError as exc:
                    # Nothing was sent: trying the next backend is safe for any method.
                    error = exc
                    conn = None
                    continue
            exchange.backend = backend.address
            break
        if self._closing or exchange.response_done:
            if conn is not None:
                conn.close()
            return
        if conn is None:
            assert error is not None
            log.info("upstream %s: %s", error.kind, error)
            self.ctx.stats.upstream_error(error.kind)
            self._answer_error(exchange, STATUS_FOR.get(error.kind, 502))
            return
        self._attach(exchange, conn, head)

    def _attach(self, exchange: Exchange, conn: BackendConnection, head: bytes) -> None:
        """Send the request on ``conn`` and let it answer to this protocol."""
        exchange.conn = conn
        conn.start(self, head_only=exchange.method == b"HEAD")
        body, exchange.body = exchange.body, None
        conn.write(head)
        if body:
            conn.write(b"".join(h1.chunk(b) for b in body) if exchange.chunked else b"".join(body))
        if exchange.request_done and exchange.chunked:
            conn.write(h1.LAST_CHUNK)
        self._resume("buffer")
        if self._writing_paused:
            conn.pause_reading()
        if not conn.reused:
            exchange.retry_head = b""  # a fresh connection that fails is not a stale one
        self._arm(self.config.response_timeout)

    async def _answer_challenge(self, exchange: Exchange) -> None:
        token = exchange.target[len(_CHALLENGE_PREFIX) :].split(b"?", 1)[0].decode("latin-1")
        assert self.ctx.challenge is not None
        try:
            value = await self.ctx.challenge(token) if token and "/" not in token else None
        except Exception as exc:  # a store error must not kill the connection
            log.error("ACME challenge lookup failed: %s", exc)
            value = None
        if self.transport is None or exchange.response_done:
            return
        if value is None:
            self._answer_error(exchange, 404)
            return
        exchange.status = 200
        exchange.response_bytes = len(value)
        keep = exchange.keep_alive and (exchange.request_done or not exchange.body_expected)
        exchange.keep_alive = keep
        self._write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
            b"Connection: %b\r\n\r\n%b" % (len(value), b"keep-alive" if keep else b"close", value)
        )
        self._finish(exchange)

    # --- answers ----------------------------------------------------------------------------
    def _answer_error(self, exchange: Exchange, status: int) -> None:
        if self.transport is None or exchange.response_done:
            return
        keep = (
            exchange.keep_alive
            and status not in (400, 408, 414, 431)
            and (exchange.request_done or not exchange.body_expected)
            and not exchange.upgrade
            and not self.ctx.draining
        )
        exchange.keep_alive = keep
        exchange.status = status
        self._write(error_response(status, keep))
        self._finish(exchange)

    def _redirect(self, exchange: Exchange, host: str) -> None:
        assert self.transport is not None
        port = self.listener.https_port
        authority = host if port == 443 else f"{host}:{port}"
        location = b"https://" + authority.encode() + exchange.target
        keep = exchange.keep_alive and (exchange.request_done or not exchange.body_expected) and not exchange.upgrade
        exchange.keep_alive = keep
        exchange.status = 301
        self._write(
            b"HTTP/1.1 301 Moved Permanently\r\nLocation: %b\r\nContent-Length: 0\r\nConnection: %b\r\n\r\n"
            % (location, b"keep-alive" if keep else b"close")
        )
        self._finish(exchange)

    def _refuse(self, status: int) -> None:
        """A malformed or too slow request: answer and close (the stream cannot be trusted)."""
        if self.transport is None:
            return
        for exchange in self.queue:
            if exchange.conn is not None:
                exchange.conn.close()
        self.queue.clear()
        self._write(error_response(status, keep_alive=False))
        self._close()

    def _finish(self, exchange: Exchange) -> None:
        exchange.response_done = True
        self.ctx.stats.request_done(exchange.status, time.monotonic() - exchange.t0)
        if self.ctx.access_log:
            log_access(exchange, self.client_ip, self.tls_version, self.tls.source.value if self.tls else "")
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if exchange.conn is not None:
            exchange.conn.close()
            exchange.conn = None
        if not exchange.keep_alive or (exchange.body_expected and not exchange.request_done) or exchange.upgrade:
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
