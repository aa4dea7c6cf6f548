"""An HTTP/1.1 Upgrade request whose upgrade edge refuses, with a body.

llhttp hands every byte after an Upgrade request's head over as bytes of the
new protocol, body included. Edge does not switch (RFC 9110 §7.8 lets a
server ignore Upgrade), so a parser of its own reads that body with the
request's framing and hands it on as any body; then the connection ends.
(An upgrade edge forwards becomes a byte pipe after the backend's 101: see
``HttpProxyProtocol.send_head``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from edge.proxy.protocol import HttpProxyProtocol
    from edge.proxy.request import Request


class BodyApart:
    def __init__(self, protocol: HttpProxyProtocol, req: Request) -> None:
        self.protocol = protocol
        self.req = req
        self.done = False

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.req.request_body(body)

    def on_message_complete(self) -> None:
        if not self.done:
            self.done = True
            self.protocol.body_apart_done()


def read_body_apart(protocol: HttpProxyProtocol, req: Request, rest: bytes) -> None:
    """Read ``req``'s body, from ``rest`` (what came after its head) on."""
    parser = protocol.parser = httptools.HttpRequestParser(BodyApart(protocol, req))
    framing = b"transfer-encoding: chunked" if req.chunked else b"content-length: %d" % (req.content_length or 0)
    parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
    if rest:
        protocol.data_received(rest)
