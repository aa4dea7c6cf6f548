"""Routing and forwarding a request, for both protocols: act on ``decide``'s
one decision, write the head for the backend, and send it on a pooled or a
new backend connection."""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

from edge.config import ProxyConfig
from edge.proxy import h1
from edge.proxy.authority import Authority
from edge.proxy.controls import rate_wait
from edge.proxy.decide import Action, decide
from edge.proxy.upstream import Backend, BackendConnection, Pool, UpstreamError

if TYPE_CHECKING:
    from edge.proxy.request import Request

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


def route(req: Request) -> None:
    """Requests per address first ([limits]), then where the request goes (``decide``)."""
    downstream = req.downstream
    shared = downstream.shared
    if shared.rate is not None:
        wait = rate_wait(shared.rate, downstream.peer, downstream.client_ip)
        if wait:
            req.answer(429, wait)
            return
    tls = downstream.tls
    decision = decide(
        shared.router, req.method, req.target, req.host_header, req.host_headers, req.version,
        tls.server_name if tls is not None else None, plain=tls is None, challenges=shared.challenge is not None,
    )
    authority = decision.authority
    if authority is not None:
        req.target = authority.target
        req.host = authority.name or ""
    req.app = decision.app
    action = decision.action
    if action is Action.FORWARD:
        assert authority is not None and decision.pool is not None
        forward(req, decision.pool, authority)
    elif action is Action.CHALLENGE:
        assert shared.challenge is not None  # decide answers challenges only when there is a lookup
        downstream.spawn(req.challenge(shared.challenge))
    elif action is Action.REDIRECT:
        req.redirect()
    else:
        req.answer(decision.status or 404)


def forward(req: Request, pool: Pool, authority: Authority) -> None:
    downstream = req.downstream
    peer = downstream.peer
    if not req.request_id:
        req.request_id = b"%b%016x" % (_request_id_prefix, next(_request_counter))  # a new id: prefix, counter
    listener = downstream.listener
    # Positional (host, client_ip, proto, port, request_id, content_length, chunked,
    # upgrade, has_connection, trusted): matching 10 keywords by name costs more.
    head = h1.request_head(
        req.method, req.target, req.headers, authority.host, downstream.client_ip, listener.scheme, listener.port,
        req.request_id, req.content_length, req.chunked, req.upgrade_to, req.has_connection,
        peer is not None and peer.trusted,
    )
    # Idempotent requests without a body may be sent again on a fresh
    # connection when a reused one turns out dead (RFC 9110 §9.2.2).
    if req.method in IDEMPOTENT and not req.body_expected and not req.upgrade:
        req.retry_head = head
    backends = pool.backends
    backend = backends[0] if len(backends) == 1 else pool.pick()  # most apps have one backend
    # http_reuse = "safe" (HAProxy's policy): the first request of a client
    # connection never rides a connection another client used.
    fresh = not downstream.served and downstream.config.http_reuse == "safe"
    conn = None if fresh else backend.take_idle()
    if conn is not None:
        # The common keep-alive case: sent now, no task, no await.
        req.backend = backend.address
        req.attach(conn, head)
    else:
        req.wait_for(connect(req, pool.candidates(first=backend), head, fresh))


def retry(req: Request) -> bool:
    """Send the request again on a fresh connection (a reused one was dead); False: no app left."""
    router = req.downstream.shared.router
    app = router.app_for(req.host)
    if app is None:
        return False
    head, req.retry_head = req.retry_head, b""
    req.body = []
    req.wait_for(connect(req, router.pool_for(app).candidates(), head))
    return True


async def connect(req: Request, candidates: list[Backend], head: bytes, fresh: bool = False) -> None:
    conn, address, error = await obtain_connection(candidates, req.downstream.config, fresh)
    req.connected(conn, address, error, head)


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
