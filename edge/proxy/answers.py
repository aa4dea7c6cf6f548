"""Answers edge makes itself, without a backend, as fields and a body: errors
(the app's own page, maintenance, Retry-After, HSTS; issue #14), redirects
to https, ACME HTTP-01 challenges. ``Request.respond`` sends them through
the same calls as a forwarded response, on either protocol."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from edge.proxy.controls import answer_head_fields, answer_page
from edge.proxy.decide import CHALLENGE_PREFIX
from edge.proxy.errors import error_body
from edge.records import App

log = logging.getLogger("edge.proxy")

# Field names as HTTP/1.1 clients have always seen them from edge (and nginx);
# ``Request.respond`` lowers them for HTTP/2 (RFC 9113 §8.2.1).
_HTML = (b"Content-Type", b"text/html; charset=utf-8")
_NO_STORE = (b"Cache-Control", b"no-store")


def error_answer(app: App | None, status: int, tls: bool, retry_after: int = 0) -> tuple[list[tuple[bytes, bytes]],
                                                                                          bytes]:
    """(fields besides the framing, body) of an error answer."""
    fields = [_HTML, _NO_STORE]
    if app is None and not retry_after:
        return fields, error_body(status)
    page, retry = answer_page(app, status)
    fields += answer_head_fields(app, status, tls, retry_after or retry)
    return fields, page or error_body(status)


def redirect_answer(host: str, target: bytes, https_port: int) -> list[tuple[bytes, bytes]]:
    """The fields of a 301 to the same resource over https (``force_https``)."""
    authority = host if https_port == 443 else f"{host}:{https_port}"
    return [(b"Location", b"https://" + authority.encode() + target)]


async def challenge_answer(lookup: Callable[[str], Awaitable[bytes | None]], target: bytes) -> bytes | None:
    """The key authorization for an HTTP-01 token (RFC 8555 §8.3), or None."""
    token = target[len(CHALLENGE_PREFIX) :].split(b"?", 1)[0].decode("latin-1")
    if not token or "/" in token:
        return None
    try:
        return await lookup(token)
    except Exception as exc:  # a store error must not kill the connection
        log.error("ACME challenge lookup failed: %s", exc)
        return None
