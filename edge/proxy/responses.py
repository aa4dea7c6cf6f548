"""The response side of a client connection: what the backend connection
calls (head, body, completion, failure, back-pressure) and the switch to a
byte pipe after ``101``. A mixin of ``HttpProxyProtocol``, kept apart so each
file holds one direction of the exchange."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from edge.proxy import h1
from edge.proxy.controls import count_done, count_upstream_error, with_hsts
from edge.proxy.exchange import Exchange, keeps_alive
from edge.proxy.upstream import UpstreamError

if TYPE_CHECKING:
    from edge.proxy.protocol import HttpProxyProtocol

log = logging.getLogger("edge.proxy.protocol")

# What a failed exchange with a backend answers (RFC 9110 §15.6.3, §15.6.5).
STATUS_FOR = {"refused": 502, "reset": 502, "protocol": 502, "closed": 502, "timeout": 504}


def _solicited(exchange: Exchange, headers: list[tuple[bytes, bytes]]) -> bool:
    """A 101 switching to a protocol the forwarded request asked for."""
    if exchange.upgrade_to is None:
        return False
    offered = h1.upgrade_protocols([(b"upgrade", exchange.upgrade_to)])
    chosen = h1.upgrade_protocols(headers)
    return bool(chosen) and all(p in offered for p in chosen)


class ResponseSide:
    # --- ResponseSink (called by the backend connection) ------------------------------------
    def response_head(self: HttpProxyProtocol, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      keep_alive: bool, chunked: bool, content_length: int | None) -> None:
        exchange = self.queue[0]
        if self.transport is None:
            return
        if status == 101:
            if not _solicited(exchange, headers):
                self._unsolicited_101(exchange)
                return
            self._open_tunnel(exchange, reason, headers)
            return
        if 100 <= status < 200:
            # Interim answers (100 Continue, 103 Early Hints) go straight through.
            self._write(
                h1.response_head(status, reason, headers, content_length=None, chunked=False, keep_alive=True)
            )
            return
        exchange.responded = True
        exchange.status = status
        exchange.retry_head = b""
        client_keep_alive = keeps_alive(exchange, self.shared.draining)
        no_body = exchange.method == b"HEAD" or status in (204, 304)
        if no_body or (content_length is not None and not chunked):
            out_chunked, out_length = False, content_length
        elif exchange.version == "1.1":
            out_chunked, out_length = True, None
        else:
            # An HTTP/1.0 client cannot read chunked: the body ends with the connection.
            out_chunked, out_length, client_keep_alive = False, None, False
        exchange.keep_alive = client_keep_alive
        exchange.content_length_out = out_length
        self._response_chunked = out_chunked
        if self.tls is not None and exchange.app is not None and exchange.app.hsts:
            headers = with_hsts(headers, exchange.app)
        self._write(
            h1.response_head(status, reason, headers, content_length=out_length,
                             chunked=out_chunked, keep_alive=client_keep_alive)
        )

    def response_body(self: HttpProxyProtocol, data: bytes) -> None:
        if self.transport is None or not data:
            return  # nothing to send; an empty chunk would be the last-chunk (RFC 9112 §7.1)
        if self._tunnel is None and self.queue:
            self.queue[0].response_bytes += len(data)
            # Activity pushes the stall deadline back; the timer itself is not touched.
            self._timer_deadline = self._loop.time() + self.config.response_timeout
        self._write(h1.chunk(data) if self._response_chunked else data)

    def response_complete(self: HttpProxyProtocol) -> None:
        exchange = self.queue[0]
        conn, exchange.conn = exchange.conn, None
        if conn is not None and not exchange.request_done:
            # Answered before the whole request body went out: the backend
            # would read the rest of it as the next request. Never pooled.
            conn.close()
        if self.transport is not None and self._response_chunked:
            self._write(h1.LAST_CHUNK)
        self._response_chunked = False
        self._finish(exchange)

    def upstream_failed(self: HttpProxyProtocol, error: UpstreamError) -> None:
        if self._tunnel is not None:
            self._tunnel = None
            self._close()
            return
        exchange = self.queue[0] if self.queue else None
        if exchange is None:
            return
        exchange.conn = None
        if exchange.responded:
            self._abort_response(exchange, error)
            return
        if error.kind == "reset" and exchange.retry_head:
            # A reused keep-alive connection the backend had closed meanwhile.
            head, exchange.retry_head = exchange.retry_head, b""
            exchange.body = []
            app = self.shared.router.app_for(exchange.host)
            if app is not None:
                self._spawn(self._forward(exchange, self.shared.router.pool_for(app).candidates(), head))
                return
        log.info("upstream %s: %s", error.kind, error)
        self.shared.stats.upstream_error(error.kind)
        count_upstream_error(exchange.app, self.shared.app_stats, error.kind)
        self._answer_error(exchange, STATUS_FOR.get(error.kind, 502))

    def _abort_response(self: HttpProxyProtocol, exchange: Exchange, error: UpstreamError) -> None:
        """Half a response went out and the rest never will: the client must see
        an incomplete message, never a complete one (no last-chunk, RFC 9112
        §8). With Content-Length or chunked framing, closing after what was
        sent tells it; a close-delimited body cannot tell, so the connection
        is aborted (RST, and no TLS close_notify: RFC 8446 §6.1)."""
        log.info("upstream %s mid-response: %s", error.kind, error)
        self.shared.stats.upstream_error(error.kind)
        count_upstream_error(exchange.app, self.shared.app_stats, error.kind)
        exchange.response_done = True
        exchange.keep_alive = False
        seconds = time.monotonic() - exchange.t0
        self.shared.stats.request_done(exchange.status, seconds, exchange.version)
        count_done(exchange.app, self.shared.app_stats, exchange.status, seconds)
        self._log(exchange)
        self.queue.clear()
        if self._response_chunked or exchange.content_length_out is not None:
            self._close()
        else:
            self._closing = True
            self._cancel_timer()
            self._batch = None
            if self.transport is not None:
                self.transport.abort()

    def _unsolicited_101(self: HttpProxyProtocol, exchange: Exchange) -> None:
        """A 101 edge did not ask for (no upgrade forwarded, or another protocol):
        the backend would be talking a protocol edge never agreed to (RFC 9110
        §15.2.2: a server switches only to a protocol the client listed)."""
        conn, exchange.conn = exchange.conn, None
        if conn is not None:
            conn.close()
        log.info("backend %s answered 101 to a request that asked for no such upgrade", exchange.backend)
        self.shared.stats.upstream_error("protocol")
        count_upstream_error(exchange.app, self.shared.app_stats, "protocol")
        self._answer_error(exchange, 502)

    def upstream_pause(self: HttpProxyProtocol) -> None:
        self._pause("upstream")

    def upstream_resume(self: HttpProxyProtocol) -> None:
        self._resume("upstream")

    # --- upgrade -------------------------------------------------------------------------
    def _open_tunnel(
        self: HttpProxyProtocol, exchange: Exchange, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        assert self.transport is not None
        exchange.responded = True
        exchange.status = 101
        self._cancel_timer()
        conn = exchange.conn
        self._write(h1.response_head(101, reason, headers, content_length=None, chunked=False,
                                              keep_alive=True))
        self._log(exchange)
        self.queue.clear()
        self._tunnel = conn
        pending, self._tunnel_pending = self._tunnel_pending or b"", None
        if conn is not None and pending:
            conn.write(bytes(pending))
        self._paused.clear()
        self.transport.resume_reading()
