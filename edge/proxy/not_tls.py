"""What a client that speaks plain HTTP to a TLS port is told.

The TLS layer only reports that the bytes are no ClientHello (it knows
nothing of HTTP); server.py hands it this answer."""

from __future__ import annotations

_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nConnection: close\r\n"
    b"Content-Length: 77\r\n\r\n"
    b"<html><body><h1>400 Plain HTTP request sent to HTTPS port</h1></body></html>\n"
)


def answer_not_tls(received: bytes) -> bytes:
    """Bytes to send before closing: a 400, as nginx does (its 497), when the
    client began with a letter (an HTTP method); nothing for other garbage."""
    return _PLAIN_HTTP_ANSWER if received[:1].isalpha() else b""
