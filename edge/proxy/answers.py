"""Answers edge writes itself, without a backend: errors, redirects to https,
ACME HTTP-01 challenges, refusals that close. A mixin of
``HttpProxyProtocol``, kept apart from the forwarding path."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edge.proxy.controls import answer_head_fields, answer_page, default_body, h1_answer
from edge.proxy.decide import CHALLENGE_PREFIX
from edge.proxy.errors import error_response
from edge.proxy.exchange import Exchange, keeps_alive, log_access

if TYPE_CHECKING:
    from edge.proxy.protocol import HttpProxyProtocol

log = logging.getLogger("edge.proxy.protocol")



class LocalAnswers:
    def _log(self: HttpProxyProtocol, exchange: Exchange) -> None:
        if self.shared.access_log:
            source = self.tls.source.value if self.tls else ""
            log_access(exchange, self.client_ip, self.tls_version, source, self.shared.access_format)

    async def _answer_challenge(self: HttpProxyProtocol, exchange: Exchange) -> None:
        token = exchange.target[len(CHALLENGE_PREFIX) :].split(b"?", 1)[0].decode("latin-1")
        assert self.shared.challenge is not None
        try:
            value = await self.shared.challenge(token) if token and "/" not in token else None
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
        keep = exchange.keep_alive = keeps_alive(exchange, self.shared.draining)
        self._write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
            b"Connection: %b\r\n\r\n%b" % (len(value), b"keep-alive" if keep else b"close", value)
        )
        self._finish(exchange)

    def _answer_error(self: HttpProxyProtocol, exchange: Exchange, status: int, retry_after: int = 0) -> None:
        if self.transport is None or exchange.response_done:
            return
        keep = exchange.keep_alive = keeps_alive(exchange, self.shared.draining, status)
        exchange.status = status
        app = exchange.app
        if app is None and not retry_after:
            self._write(error_response(status, keep))
        else:
            # Issue #14: the app's own page (or maintenance), HSTS on HTTPS, Retry-After.
            page, retry = answer_page(app, status)
            fields = answer_head_fields(app, status, self.tls is not None, retry_after or retry)
            if page is None and not fields:
                self._write(error_response(status, keep))
            else:
                self._write(h1_answer(status, keep, page or default_body(status), fields))
        self._finish(exchange)

    def _redirect(self: HttpProxyProtocol, exchange: Exchange, host: str) -> None:
        assert self.transport is not None
        port = self.listener.https_port
        authority = host if port == 443 else f"{host}:{port}"
        location = b"https://" + authority.encode() + exchange.target
        keep = exchange.keep_alive = keeps_alive(exchange, self.shared.draining)
        exchange.status = 301
        self._write(
            b"HTTP/1.1 301 Moved Permanently\r\nLocation: %b\r\nContent-Length: 0\r\nConnection: %b\r\n\r\n"
            % (location, b"keep-alive" if keep else b"close")
        )
        self._finish(exchange)

    def _refuse(self: HttpProxyProtocol, status: int) -> None:
        """A malformed or too slow request: answer and close (the stream cannot be trusted)."""
        if self.transport is None:
            return
        for exchange in self.queue:
            if exchange.conn is not None:
                exchange.conn.close()
        self.queue.clear()
        self._write(error_response(status, keep_alive=False))
        self._close()
