"""The one authority a request is routed, checked and forwarded by.

RFC 9112 §3.2.2: when the request target is in absolute-form, a proxy
ignores Host and uses the target's authority instead. Edge routes by that
authority, compares it with SNI (421), and sends it to the backend as Host,
so no two parts of edge can disagree on which app a request is for.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import httptools

from edge import names
from edge.proxy.errors import HttpError


class Authority(NamedTuple):
    name: str | None  # the host name to route by; None: names no app (an IP literal)
    target: bytes  # the request target in origin-form (or "*")
    host: bytes  # the Host field to forward


# A NamedTuple's generated __new__ is a Python function: on the per-request
# path the tuple is made directly (one C call instead of a Python frame).
_new = tuple.__new__


def request_authority(
    target: bytes, host_header: bytes | None, host_headers: int, version: str, sni: str | None
) -> Authority:
    if host_headers > 1:
        raise HttpError(400, "several Host headers")  # RFC 9112 §3.2
    raw = host_header
    if target[:1] != b"/" and target != b"*":
        raw, target = _absolute_form(target)
    elif raw is None:
        if version != "1.0":
            # RFC 9112 §3.2; an HTTP/2 request names its authority too (RFC 9113 §8.3.1).
            raise HttpError(400, "no Host header")
        # HTTP/1.0 without Host: the TLS server name is the only authority.
        return Authority(sni, target, sni.encode() if sni else b"")
    authority = raw.strip()
    host = authority
    if host.startswith(b"["):
        return Authority(None, target, authority)  # an IP literal names no app
    # ``find``, not ``in``: bytes.__contains__ tries the argument as an integer
    # first, and the TypeError it raises and clears costs more than the search.
    if host.find(b":") >= 0:
        host, _, port = host.rpartition(b":")
        if not port.isdigit():
            raise HttpError(400, "invalid Host port")
    if host.find(b"@") >= 0:
        raise HttpError(400, "userinfo in the authority")  # RFC 9110 §4.2.4
    return _new(Authority, (names.normalize(host), target, authority))


def _absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """(authority, origin-form target) of an absolute-form target (RFC 9112 §3.2.2)."""
    try:
        # Any: httptools' stubs declare every part bytes, but an absent part
        # is None, and compiled code (mypyc) would check the declared type.
        url: Any = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise HttpError(400, "invalid request target") from None
    if url.schema is None or url.schema.lower() not in (b"http", b"https"):
        raise HttpError(400, "request target scheme is not http or https")
    if url.userinfo is not None:
        # RFC 9110 §4.2.4: userinfo is deprecated in http(s) URIs; a recipient
        # should treat it as an error (it hides the real host from a reader).
        raise HttpError(400, "userinfo in the request target")
    if not url.host:
        raise HttpError(400, "no host in the request target")  # RFC 9110 §4.2.1
    host = b"[" + url.host + b"]" if b":" in url.host else url.host
    authority = host + b":%d" % url.port if url.port is not None else host
    path = url.path or b"/"
    return authority, path + (b"?" + url.query if url.query is not None else b"")
