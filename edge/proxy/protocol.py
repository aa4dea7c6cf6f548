"""The client side of the data path: an asyncio.Protocol over httptools.

Per connection: the transport, the parser, timers. Per request: an
``Exchange`` (head, body framing, the backend connection serving it).
Requests are answered in order; pipelined ones wait in a queue, with reading
paused so they cannot pile up. Bodies stream both ways with back-pressure:
a slow client pauses the backend's reads, a slow backend pauses the client's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

import httptools

from edge.config import ProxyConfig
from edge.proxy import h1
from edge.proxy.errors import HttpError, error_response
from edge.proxy.routing import Router
from edge.proxy.upstream import BackendConnection, UpstreamError
from edge.tls import names
from edge.tls.acceptor import TlsInfo

log = logging.getLogger(__name__)

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_STATUS_FOR = {"refused": 502, "reset": 502, "protocol": 502, "timeout": 504}


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    scheme: bytes  # b"https" or b"http"
    port: bytes  # the listener's port, for X-Forwarded-Port
    https_port: int  # where redirects to https point


class Exchange:
    """One request and its response."""

    __slots__ = (
        "body",
        "body_expected",
        "chunked",
        "conn",
        "content_length",
        "head_bytes",
        "headers",
        "keep_alive",
        "method",
        "request_done",
        "responded",
        "response_done",
        "retries",
        "started",
        "t0",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.content_length: int | None = None
        self.body: list[bytes] | None = []  # buffered until a backend is connected; None once streaming
        self.request_done = False
        self.started = False
        self.conn: BackendConnection | None = None
        self.responded = False  # the response head went to the client
        self.response_done = False
        self.retries = 0
        self.head_bytes = 0
        self.t0 = time.monotonic()
        self.body_expected = False


class HttpProxyProtocol(asyncio.Protocol):
    def __init__(self, router: Router, config: ProxyConfig, listener: ListenerInfo, tls: TlsInfo | None) -> None:
        self.router = router
        self.config = config
        self.listener = listener
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.client_ip = b""
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._closing = False
        self._header_name = b""
        self._response_chunked = False
        self._retry_head = b""
        # The exchange whose request the parser is reading (the last one begun);
        # it may already be answered (an early 404) while its body still arrives.
        self._parsing: Exchange | None = None

    # --- connection ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]).encode() if peer else b""
        self._set_timer(self.config.request_head_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        for exchange in self.queue:
            if exchange.conn is not None:
                exchange.conn.close()  # the client is gone: nobody to answer
        self.queue.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpError as exc:
            self._refuse(exc.status)
        except httptools.HttpParserUpgrade:
            self._refuse(501)  # Upgrade: the full data path issue adds the byte pipe
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._refuse(cause.status if isinstance(cause, HttpError) else 400)

    def eof_received(self) -> bool | None:
        # A client half-close ends the request stream; answer what is in flight, then close.
        return self.queue

    def pause_writing(self) -> None:
        self._writing_paused = True
        head = self.queue[0] if self.queue else None
        if head is not None and head.conn is not None:
            head.conn.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        head = self.queue[0] if self.queue else None
        if head is not None and head.conn is not None:
            head.conn.resume_reading()

    # --- timers --------------------------------------------------------------------
    def _set_timer(self, delay: float, callback: object) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)  # type: ignore[arg-type]

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._refuse(408) if self.queue else self._close()

    def _idle_timeout(self) -> None:
        self._close()

    def _response_timeout(self) -> None:
        head = self.queue[0] if self.queue else None
        if head is not None and not head.responded:
            if head.conn is not None:
                head.conn.close()
                head.conn = None
            self._answer_error(head, 504)

    # --- httptools request callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        exchange = Exchange()
        self._parsing = exchange
        self.queue.append(exchange)
        if len(self.queue) == 1:
            self._set_timer(self.config.request_head_timeout, self._head_timeout)

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
        exchange.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        parser = self.parser
        exchange.method = parser.get_method()
        exchange.version = parser.get_http_version()
        exchange.keep_alive = parser.should_keep_alive()
        exchange.content_length, exchange.chunked = h1.check_framing(exchange.headers)
        exchange.body_expected = exchange.chunked or bool(exchange.content_length)
        if exchange is self.queue[0]:
            self._cancel_timer()
            self._start(exchange)
        elif not self._reading_paused and self.transport is not None:
            # Pipelined behind a request still in flight: stop reading until its turn.
            self._reading_paused = True
            self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        if exchange.response_done:
            return  # answered early (an error): the rest of its body is dropped
        if exchange.body is not None:
            exchange.body.append(body)
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

    # --- routing and forwarding ----------------------------------------------------------
    def _host(self, exchange: Exchange) -> str | None:
        raw = next((v for n, v in exchange.headers if n == b"host"), None)
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
        host = host.rsplit(b":", 1)[0] if b":" in host else host
        return names.normalize(host)

    def _start(self, exchange: Exchange) -> None:
        exchange.started = True
        try:
            host = self._host(exchange)
        except HttpError as exc:
            self._answer_error(exchange, exc.status)
            return
        if host is None:
            self._answer_error(exchange, 404)
            return
        sni = self.tls.server_name if self.tls is not None else None
        if sni is not None and not self.router.same_certificate(sni, host):
            self._answer_error(exchange, 421)
            return
        app = self.router.app_for(host)
        if app is None:
            self._answer_error(exchange, 404)
            return
        if self.tls is None and app.force_https:
            self._redirect(exchange, host)
            return
        pool = self.router.pool_for(app)
        candidates = pool.candidates()
        if not candidates:
            self._answer_error(exchange, 503)
            return
        request_id = next((v for n, v in exchange.headers if n == b"x-request-id"), None)
        if request_id is None:
            request_id = os.urandom(16).hex().encode()
        head = h1.request_head(
            exchange.method,
            exchange.target,
            exchange.headers,
            host=host.encode(),
            client_ip=self.client_ip,
            proto=self.listener.scheme,
            port=self.listener.port,
            request_id=request_id,
            content_length=exchange.content_length,
            chunked=exchange.chunked,
        )
        asyncio.get_running_loop().create_task(self._forward(exchange, candidates, head))

    async def _forward(self, exchange: Exchange, candidates: list, head: bytes) -> None:
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
            break
        if self._closing or exchange not in self.queue:
            if conn is not None:
                conn.close()
            return
        if conn is None:
            assert error is not None
            self._answer_error(exchange, _STATUS_FOR.get(error.kind, 502))
            return
        exchange.conn = conn
        conn.start(self, head_only=exchange.method == b"HEAD")
        body, exchange.body = exchange.body, None
        conn.write(head)
        if body:
            conn.write(b"".join(h1.chunk(b) for b in body) if exchange.chunked else b"".join(body))
        if exchange.request_done and exchange.chunked:
            conn.write(h1.LAST_CHUNK)
        if self._writing_paused:
            conn.pause_reading()
        self._set_timer(self.config.response_timeout, self._response_timeout)
        # Keep a retry copy only for idempotent requests without a body.
        retryable = exchange.method in IDEMPOTENT and conn.reused and not body and exchange.request_done
        exchange.retries = 1 if retryable else 0
        self._retry_head = head

    # --- ResponseSink (called by the backend connection) -----------------------------------
    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      keep_alive: bool, chunked: bool, content_length: int | None) -> None:
        exchange = self.queue[0]
        if self.transport is None:
            return
        if 100 <= status < 200:
            self.transport.write(b"HTTP/1.1 %d %b\r\n\r\n" % (status, reason or b"Continue"))
            return
        self._cancel_timer()
        exchange.responded = True
        client_keep_alive = exchange.keep_alive and not self._closing
        no_body = exchange.method == b"HEAD" or status in (204, 304)
        if no_body:
            out_chunked = False
            out_length = content_length
        elif content_length is not None and not chunked:
            out_chunked, out_length = False, content_length
        elif exchange.version == "1.1":
            out_chunked, out_length = True, None
        else:
            # An HTTP/1.0 client cannot read chunked: the body ends with the connection.
            out_chunked, out_length, client_keep_alive = False, None, False
        exchange.keep_alive = client_keep_alive
        self._response_chunked = out_chunked
        self.transport.write(
            h1.response_head(status, reason, headers, content_length=out_length,
                             chunked=out_chunked, keep_alive=client_keep_alive)
        )

    def response_body(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(h1.chunk(data) if self._response_chunked else data)

    def response_complete(self) -> None:
        exchange = self.queue[0]
        exchange.conn = None
        if self.transport is not None and self._response_chunked:
            self.transport.write(h1.LAST_CHUNK)
        self._response_chunked = False
        self._finish(exchange)

    def upstream_failed(self, error: UpstreamError) -> None:
        exchange = self.queue[0] if self.queue else None
        if exchange is None:
            return
        exchange.conn = None
        if exchange.responded:
            # Half a response went out: the only honest signal left is to close.
            self._close()
            return
        if error.kind == "reset" and exchange.retries > 0:
            # A reused keep-alive connection the backend had closed: retry once
            # on a fresh connection, safe for idempotent requests (RFC 9110 §9.2.2).
            exchange.retries -= 1
            exchange.body = []
            app = self.router.app_for(self._host(exchange) or "")
            if app is not None:
                asyncio.get_running_loop().create_task(
                    self._forward(exchange, self.router.pool_for(app).candidates(), self._retry_head)
                )
                return
        log.info("upstream %s: %s", error.kind, error)
        self._answer_error(exchange, _STATUS_FOR.get(error.kind, 502))

    def upstream_pause(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self.transport.pause_reading()

    def upstream_resume(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self.transport.resume_reading()

    # --- answers -----------------------------------------------------------------------
    def _answer_error(self, exchange: Exchange, status: int) -> None:
        if self.transport is None:
            return
        self._cancel_timer()
        keep = (
            exchange.keep_alive
            and status not in (400, 408, 414, 431)
            and (exchange.request_done or not exchange.body_expected)
        )
        exchange.keep_alive = keep
        self.transport.write(error_response(status, keep))
        self._finish(exchange)

    def _redirect(self, exchange: Exchange, host: str) -> None:
        assert self.transport is not None
        port = self.listener.https_port
        authority = host if port == 443 else f"{host}:{port}"
        location = b"https://" + authority.encode() + exchange.target
        keep = exchange.keep_alive and (exchange.request_done or not exchange.body_expected)
        exchange.keep_alive = keep
        self.transport.write(
            b"HTTP/1.1 301 Moved Permanently\r\nLocation: %b\r\nContent-Length: 0\r\nConnection: %b\r\n\r\n"
            % (location, b"keep-alive" if keep else b"close")
        )
        self._finish(exchange)

    def _refuse(self, status: int) -> None:
        """A malformed request: answer and close (the stream cannot be trusted)."""
        if self.transport is None:
            return
        for exchange in self.queue:
            if exchange.conn is not None:
                exchange.conn.close()
        self.queue.clear()
        self.transport.write(error_response(status, keep_alive=False))
        self._close()

    def _finish(self, exchange: Exchange) -> None:
        exchange.response_done = True
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if exchange.conn is not None:
            exchange.conn.close()
            exchange.conn = None
        if not exchange.keep_alive or (exchange.body_expected and not exchange.request_done):
            # Closing mid-body (an early error answer) avoids reading a body
            # nobody wants; a client that wants more opens a new connection.
            self._close()
            return
        if self.queue:
            nxt = self.queue[0]
            if nxt.method:  # its head is complete
                self._start(nxt)
            else:
                self._set_timer(self.config.request_head_timeout, self._head_timeout)
        else:
            self._set_timer(self.config.idle_timeout, self._idle_timeout)
        if self._reading_paused and len(self.queue) <= 1 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
