"""The client side of a request, as the request sees it: the ``Downstream``
interface; the one rule for whether an HTTP/1.x connection stays alive
after an answer; and what an HTTP/1.1 and an HTTP/2 connection share as
asyncio protocols (who the client is, the read buffer, the connection's
place in the proxy context, tasks)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.tls.acceptor import TlsInfo
from edge.tls.gate import Peer

if TYPE_CHECKING:
    from edge.config import ProxyConfig
    from edge.proxy.h1 import Headers
    from edge.proxy.request import Request
    from edge.proxy.upstream import UpstreamError

# What the client transport may hold unsent before the backend is paused.
# asyncio's default high-water mark is 64 KiB too, but explicit: a stalled
# reader must cost little (a backend read is at most this much on top).
WRITE_HIGH_WATER = 64 * 1024

# One read buffer for every client connection of this process. uvloop's TLS
# transport reads into it and ``buffer_updated`` parses it before returning,
# so connections never see each other's bytes. Without it (a plain Protocol)
# each TLS read allocates and shrinks a 256 KiB bytes object: mmap, mremap and
# munmap were 7% of a keep-alive profile. And no per-connection buffer: idle
# connections stay small.
_READ_BUFFER = memoryview(bytearray(64 * 1024))

# Answers after which the request stream cannot be trusted: malformed (400), too
# slow (408), too long (414, 431). The connection closes with them.
CLOSING_STATUSES = frozenset({400, 408, 414, 431})


class Downstream(Protocol):
    """What a ``Request`` drives: an HTTP/1.1 connection, or an HTTP/2
    connection for one of its streams (``req.sid``)."""

    shared: ProxyContext  # the proxy context every connection shares (not a TLS SSLContext)
    config: ProxyConfig
    listener: ListenerInfo
    tls: TlsInfo | None
    peer: Peer | None
    client_ip: bytes
    tls_version: str
    served: int  # requests finished on this connection
    write_paused: bool  # the client's socket is full

    def send_head(self, req: Request, status: int, reason: bytes, headers: Headers,
                  length: int | None, no_body: bool) -> None:
        """A response head (interim below 200); ``length`` None: unknown, the body streams."""

    def send_body(self, req: Request, data: bytes) -> None: ...

    def end(self, req: Request) -> None:
        """The response is complete (``req`` is DONE and accounted)."""

    def abort(self, req: Request, error: UpstreamError) -> None:
        """The response cannot be finished: the client must see it cut short."""

    def pause(self, req: Request) -> None:
        """Stop reading the request body (the backend is not taking it, or enough is held)."""

    def resume(self, req: Request) -> None: ...

    def waiting(self, req: Request) -> None:
        """The request is with the backend: its response timer starts."""

    def batch_begin(self) -> None: ...
    def batch_end(self) -> None: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


def keeps_alive(req: Request, draining: bool, close_delimited: bool = False) -> bool:
    """Whether an HTTP/1.x connection stays open after this request's answer: the
    one rule for every answer (forwarded, error, redirect, challenge). Not when
    the client or a shutdown says so (``req.keep_alive`` starts as the client's
    wish; an answer that ends trust in the stream clears it), not after a request
    that asked to upgrade (its parser is spent), not when the body ends with the
    connection, not while the request body is still unread (reading a body nobody
    wants costs more than a new connection)."""
    return (
        req.keep_alive
        and not draining
        and not req.upgrade
        and not close_delimited
        and (req.request_done or not req.body_expected)
    )


def bodiless(method: bytes, status: int) -> bool:
    """A response that has no body whatever its fields say (RFC 9110 §6.4.1)."""
    return method == b"HEAD" or status == 204 or status == 304


class ClientConnection(asyncio.BufferedProtocol):
    """What both protocols' connections do alike."""

    def __init__(self, shared: ProxyContext, listener: ListenerInfo, tls: TlsInfo | None,
                 peer: Peer | None = None) -> None:
        self.shared = shared  # the proxy context (not an SSLContext)
        self.config = shared.config
        self.listener = listener
        self.tls = tls
        # The client when a control named it (PROXY header, limits); None: the socket's peer.
        self.peer = peer if peer is not None or tls is None else tls.peer
        self.transport: asyncio.Transport | None = None
        self.client_ip = b""
        self.tls_version = ""
        self.served = 0
        self.write_paused = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in connection_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        if self.peer is not None:
            self.client_ip = self.peer.ip
        else:
            peername = transport.get_extra_info("peername")
            self.client_ip = str(peername[0]).encode() if peername else b""
        if self.tls is not None:
            sslobj = transport.get_extra_info("ssl_object")
            self.tls_version = (sslobj.version() or "") if sslobj is not None else ""
        self.shared.connections.add(self)
        # Bounded buffering per connection: above this the backends are paused
        # (pause_writing), so a client that reads nothing holds little.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.connections.discard(self)
        if self.peer is not None and self.peer.slot is not None:
            self.peer.slot.release()  # [limits]: the connection's place frees now, not at collection

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_BUFFER[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # The loop holds tasks weakly: keep a reference until each is done.
        task = self._loop.create_task(coro)
        tasks = self.shared.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
