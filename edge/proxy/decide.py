"""Where a request goes: one pure decision for HTTP/1.1 and HTTP/2 alike.

From the request's method, target and authority fields, the TLS server name
and the router's view of the store: forward to an app's pool, answer with a
status, redirect to https, or answer an ACME HTTP-01 challenge. No I/O, no
protocol state: the HTTP/1.1 connection and the HTTP/2 stream act on it the
same way, so SPEC §5's routing rules hold for both by construction.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import NamedTuple

from edge.proxy.authority import Authority, request_authority
from edge.proxy.errors import HttpError
from edge.proxy.routing import Router
from edge.proxy.upstream import Pool
from edge.records import App

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"


class Action(Enum):
    FORWARD = auto()
    ANSWER = auto()  # an error status edge answers itself
    REDIRECT = auto()  # 301 to https (port 80, force_https)
    CHALLENGE = auto()  # an ACME HTTP-01 token (port 80)


class Decision(NamedTuple):
    action: Action
    status: int = 0
    authority: Authority | None = None
    pool: Pool | None = None
    app: App | None = None  # the app routed to, once known (per-app settings and series, issue #14)

    @property
    def host(self) -> str:
        return (self.authority.name or "") if self.authority is not None else ""


_new = tuple.__new__
_FORWARD = Action.FORWARD


def _answer(status: int, authority: Authority | None = None, app: App | None = None) -> Decision:
    return Decision(Action.ANSWER, status, authority, None, app)


def decide(
    router: Router,
    method: bytes,
    target: bytes,
    host_header: bytes | None,
    host_headers: int,
    version: str,
    sni: str | None,
    plain: bool,
    challenges: bool = True,
) -> Decision:
    """``plain``: the request came on the port-80 listener (no TLS); ``challenges``:
    ACME HTTP-01 tokens are answered there."""
    if method == b"CONNECT":
        # RFC 9110 §9.3.6: CONNECT asks a forward proxy for a tunnel; edge is a gateway.
        return _answer(501)
    try:
        authority = request_authority(target, host_header, host_headers, version, sni)
    except HttpError as exc:
        return _answer(exc.status)
    host = authority.name
    if plain and challenges and authority.target.startswith(CHALLENGE_PREFIX):
        return Decision(Action.CHALLENGE, 0, authority)
    if host is None:
        return _answer(404, authority)
    if sni is not None and sni != host and not router.same_certificate(sni, host):
        # RFC 9110 §15.5.20, RFC 9113 §9.1.1: a connection serves the names its certificate covers.
        return _answer(421, authority)
    app = router.app_for(host)
    if app is None:
        # The host's first load of the store is under way: the name may not be read yet (try again soon).
        return _answer(503 if router.loading() else 404, authority)
    if plain and app.force_https:
        return Decision(Action.REDIRECT, 301, authority, None, app)
    if app.maintenance:
        # Issue #14: 503 with the maintenance page, the backend untouched (ACME
        # challenges were answered above, before any app is looked up).
        return _answer(503, authority, app)
    pool = router.pool_for(app)
    if not pool.backends:
        return _answer(503, authority, app)
    return _new(Decision, (_FORWARD, 0, authority, pool, app))  # Decision(...), without its Python __new__
