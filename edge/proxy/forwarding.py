"""The request side of a client connection: route a parsed request head by
its one authority, write the head for the backend, and send it on a pooled
or new backend connection. A mixin of ``HttpProxyProtocol``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import httptools

from edge.config import ProxyConfig
from edge.proxy import h1
from edge.proxy.controls import count_upstream_error, rate_wait
from edge.proxy.decide import Action, decide
from edge.proxy.exchange import Exchange
from edge.proxy.responses import STATUS_FOR
from edge.proxy.upstream import Backend, BackendConnection, Pool, UpstreamError

if TYPE_CHECKING:
    from edge.proxy.protocol import HttpProxyProtocol

log = logging.getLogger("edge.proxy.protocol")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# Request ids: a random per-process prefix and a counter. Unique across a
# fleet without a system call per request (os.urandom costs one). Drawn again
# in every forked child: workers fork after this module is imported, and a
# prefix inherited from the parent would repeat ids across workers.
_request_id_prefix = b""
_request_counter = itertools.count(1)


def _new_request_id_prefix() -> None:
    global _request_id_prefix, _request_counter
    _request_id_prefix = os.urandom(8).hex().encode()
    _request_counter = itertools.count(1)


_new_request_id_prefix()
os.register_at_fork(after_in_child=_new_request_id_prefix)


def next_request_id() -> bytes:
    return b"%b%016x" % (_request_id_prefix, next(_request_counter))


class _BodyApart:
    """Reads the body of an Upgrade request whose upgrade edge refused.

    llhttp hands every byte after an Upgrade request's head over as bytes of
    the new protocol, body included. Edge does not switch (RFC 9110 §7.8 lets
    a server ignore Upgrade), so a parser of its own reads that body with the
    request's framing and hands it on as any body; then the connection ends.
    """

    def __init__(self, protocol: HttpProxyProtocol) -> None:
        self.protocol = protocol
        self.done = False

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.protocol.on_body(body)

    def on_message_complete(self) -> None:
        if not self.done:
            self.done = True
            self.protocol._pause("upgrade")  # nothing after it is read: the connection ends
            exchange = self.protocol._parsing
            if exchange is not None:
                exchange.body_apart = False
                self.protocol.on_message_complete()


async def obtain_connection(
    candidates: list[Backend], config: ProxyConfig, fresh: bool = False
) -> tuple[BackendConnection | None, str, UpstreamError | None]:
    """A connection to the first candidate that has an idle one or accepts a new one
    (``fresh``: never a pooled one); else the last error. Nothing was sent on a
    refused connection, so trying the next backend is safe for any method."""
    error: UpstreamError | None = None
    for backend in candidates:
        conn = None if fresh else backend.take_idle()
        if conn is None:
            try:
                conn = await backend.connect(config.connect_timeout)
            except UpstreamError as exc:
                error = exc
                continue
        return conn, backend.address, None
    return None, "", error or UpstreamError("refused", "no backend to try")


class RequestSide:
    def _read_body_apart(self: HttpProxyProtocol, exchange: Exchange, rest: bytes) -> None:
        self.parser = httptools.HttpRequestParser(_BodyApart(self))
        framing = b"transfer-encoding: chunked" if exchange.chunked else b"content-length: %d" % (
            exchange.content_length or 0)
        self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        if rest:
            self.data_received(rest)

    def _start(self: HttpProxyProtocol, exchange: Exchange) -> None:
        exchange.started = True
        if self.shared.rate is not None:
            wait = rate_wait(self.shared.rate, self.peer, self.client_ip)
            if wait:
                self._answer_error(exchange, 429, wait)
                return
        sni = self.tls.server_name if self.tls is not None else None
        decision = decide(
            self.shared.router, exchange.method, exchange.target, exchange.host_header, exchange.host_headers,
            exchange.version, sni, plain=self.tls is None, challenges=self.shared.challenge is not None,
        )
        authority = decision.authority
        if authority is not None:
            exchange.target = authority.target
            exchange.host = authority.name or ""
        action = decision.action
        if action is Action.CHALLENGE:
            self._spawn(self._answer_challenge(exchange))
            return
        if action is Action.REDIRECT:
            self._redirect(exchange, exchange.host)
            return
        exchange.app = decision.app
        if action is not Action.FORWARD:
            self._answer_error(exchange, decision.status or 404)
            return
        assert authority is not None and decision.pool is not None
        pool = decision.pool
        if not exchange.request_id:
            exchange.request_id = next_request_id()
        head = h1.request_head(
            exchange.method,
            exchange.target,
            exchange.headers,
            host=authority.host,
            client_ip=self.client_ip,
            proto=self.listener.scheme,
            port=self.listener.port,
            request_id=exchange.request_id,
            content_length=exchange.content_length,
            chunked=exchange.chunked,
            upgrade=exchange.upgrade_to,
            has_connection=exchange.has_connection,
            trusted=self.peer is not None and self.peer.trusted,
        )
        # Idempotent requests without a body may be sent again on a fresh
        # connection when a reused one turns out dead (RFC 9110 §9.2.2).
        if exchange.method in IDEMPOTENT and not exchange.body_expected and not exchange.upgrade:
            exchange.retry_head = head
        self._dispatch(exchange, pool, head)

    def _dispatch(self: HttpProxyProtocol, exchange: Exchange, pool: Pool, head: bytes) -> None:
        """Send on an idle pooled connection now when the chosen backend has one
        (the common keep-alive case: no task, no await); else connect in a task."""
        backend = pool.pick()
        # http_reuse = "safe" (HAProxy's policy): the first request of a client
        # connection never rides a connection another client used.
        fresh = not self._served and self.config.http_reuse == "safe"
        conn = None if fresh else backend.take_idle()
        if conn is not None:
            exchange.backend = backend.address
            self._attach(exchange, conn, head)
        else:
            self._spawn(self._forward(exchange, pool.candidates(first=backend), head, fresh))

    def _spawn(self: HttpProxyProtocol, coro: Coroutine[Any, Any, None]) -> None:
        # The loop holds tasks weakly: keep a reference until each is done.
        task = asyncio.get_running_loop().create_task(coro)
        tasks = self.shared.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _forward(
        self: HttpProxyProtocol, exchange: Exchange, candidates: list[Backend], head: bytes, fresh: bool = False
    ) -> None:
        conn, address, error = await obtain_connection(candidates, self.config, fresh)
        if conn is not None:
            exchange.backend = address
        if self._closing or exchange.response_done:
            if conn is not None:
                conn.close()
            return
        if conn is None:
            assert error is not None
            log.info("upstream %s: %s", error.kind, error)
            self.shared.stats.upstream_error(error.kind)
            count_upstream_error(exchange.app, self.shared.app_stats, error.kind)
            self._answer_error(exchange, STATUS_FOR.get(error.kind, 502))
            return
        self._attach(exchange, conn, head)

    def _attach(self: HttpProxyProtocol, exchange: Exchange, conn: BackendConnection, head: bytes) -> None:
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
