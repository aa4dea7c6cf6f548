"""What an HTTP/2 stream adds to a ``Request``: the request made from a
HEADERS event (RFC 9113 §8.3.1 checks, framing for the HTTP/1.1 backend),
and the response fields as HTTP/2 carries them (RFC 9113 §8.2.2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge.h2.headers import Request as H2Head
from edge.proxy import h1
from edge.proxy.request import Request

if TYPE_CHECKING:
    from edge.proxy.downstream import Downstream

# Response bytes queued for one stream (its client window is shut) before its
# backend is paused. With one backend read (64 KiB) on top, 100 streams whose
# client reads nothing hold ~8 MiB.
STREAM_HIGH_WATER = 16 * 1024
# RFC 9113 §8.2.2: connection-specific fields never go into an HTTP/2 response.
_NOT_IN_H2 = h1.HOP_BY_HOP | {b"content-length"}


def open_request(downstream: Downstream, sid: int, head: H2Head, end_stream: bool) -> Request:
    """The stream's request, not begun yet (``req.start(refused(...))``)."""
    req = Request(downstream, head.method, head.path, list(head.h1_fields), "2")
    req.sid = sid
    authority = head.authority or head.host
    req.host_header = authority
    req.host_headers = 1 if authority is not None else 0
    req.request_id = head.request_id
    req.request_done = end_stream
    req.body_expected = not end_stream
    req.content_length = head.content_length
    # No Content-Length and a body: it goes to the backend chunked, and so can
    # its trailers (RFC 9112 §7.1.2).
    req.chunked = head.content_length is None and not end_stream
    return req


def refused(downstream: Downstream, head: H2Head) -> int:
    """The status a malformed or oversized head is answered with; 0: none."""
    if head.too_large:
        return 431
    if len(head.path) > downstream.config.max_uri_bytes:
        return 414
    if head.path[:1] != b"/" and not (head.path == b"*" and head.method == b"OPTIONS"):
        return 400  # RFC 9113 §8.3.1: origin-form, or * for OPTIONS
    return 0


def response_fields(status: int, headers: h1.Headers, length: int | None) -> list[tuple[bytes, bytes]]:
    drop = h1.connection_tokens(headers)
    out = [(b":status", b"%d" % status)]
    out += [(n, v) for n, v in headers if n not in _NOT_IN_H2 and n not in drop]
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out
