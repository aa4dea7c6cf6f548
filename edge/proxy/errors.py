"""Error answers: a status, a reason the client can act on, and a small HTML page.

Pre-encoded once; answering an error allocates nothing per request.
"""

from __future__ import annotations

from http import HTTPStatus


class HttpError(Exception):
    """Raised where a request cannot go on; carries the status to answer with."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(detail or phrase(status))
        self.status = status
        self.detail = detail


# RFC 9110 names where Python's http.HTTPStatus still has older phrases.
_PHRASES = {413: "Content Too Large", 414: "URI Too Long"}


def phrase(status: int) -> str:
    return _PHRASES.get(status) or HTTPStatus(status).phrase


def error_body(status: int) -> bytes:
    """The small HTML page of an error answer (HTTP/2 sends it without a head to fill)."""
    phrase_text = phrase(status)
    return (
        f"<html><head><title>{status} {phrase_text}</title></head>"
        f"<body><h1>{status} {phrase_text}</h1><hr><p>edge</p></body></html>\n"
    ).encode()


def _page(status: int) -> bytes:
    phrase_text = phrase(status)
    body = error_body(status)
    head = (
        f"HTTP/1.1 {status} {phrase_text}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
    ).encode()
    return head + b"%b\r\n\r\n" + body  # %b: the Connection header, filled per answer


_PAGES = {
    s: _page(s)
    for s in (400, 404, 408, 413, 414, 421, 431, 500, 501, 502, 503, 504)
}


def error_response(status: int, keep_alive: bool) -> bytes:
    template = _PAGES.get(status) or _page(status)
    connection = b"Connection: keep-alive" if keep_alive else b"Connection: close"
    return template.replace(b"%b", connection, 1)
