"""The ceilings of edge's stack: uvloop TLS servers doing as little as possible.

Same TLS settings and certificate as edge (``edge.tls.contexts``) and an
``asyncio.Protocol`` per connection, in one of two modes:

* without ``--backend`` (peer ``uvloop-tls``): every request head is answered
  with a fixed response, no backend at all. Whatever edge does on top
  (reading the ClientHello, picking a certificate, parsing, proxying) can only
  cost more, so this is the most any server on CPython's ``ssl`` and uvloop
  can reach;
* with ``--backend HOST:PORT`` (peer ``uvloop-relay``): the cheapest proxy on
  that stack. Each client connection gets its own backend connection, opened
  on its first bytes and kept for the keep-alive requests that follow; request
  bytes go to it verbatim and response bytes come back verbatim, nothing is
  parsed. When the backend closes (it honours ``Connection: close``), the
  client connection is closed. It pays the backend hop (loopback TCP,
  syscalls, wakeups) that edge and nginx pay, but none of their parsing.
  Unlike them it opens a backend connection per client connection, which a
  handshake with one ``Connection: close`` request pays in full;
* with ``--backend HOST:PORT --pool`` (peer ``uvloop-pool``): the same relay
  with one pool of backend connections shared by all clients, as edge's and
  nginx's are. For that it parses the least a pool needs: it finds request
  heads (GET, no body) to take ``Connection: close`` off (and close the
  client itself after the answer, which says ``Connection: close``), and each
  response's Content-Length to know when its backend connection is free.

Run with ``--peers edge,nginx,uvloop-tls,uvloop-relay,uvloop-pool`` on the handshake and
keep-alive scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import uvloop

from edge.tls import contexts

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: %b\r\n\r\nhello, world\n"
_KEEP = _ANSWER % b"keep-alive"
_CLOSE = _ANSWER % b"close"


class Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        out = []
        while (end := self.pending.find(b"\r\n\r\n")) >= 0:
            head, self.pending = self.pending[:end], self.pending[end + 4:]
            if b"onnection: close" in head:
                out.append(_CLOSE)
                self.transport.write(b"".join(out))  # type: ignore[attr-defined]
                self.transport.close()
                return
            out.append(_KEEP)
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


class Upstream(asyncio.Protocol):
    """The backend side of one relayed connection: its bytes go to the client verbatim."""

    def __init__(self, client: Relay) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        # The backend closed (after a Connection: close answer, or failing):
        # so does the client connection, once what was relayed is written.
        self.client.transport.close()

    # The backend reads slower than the client sends: stop reading the client.
    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class Relay(asyncio.Protocol):
    """The client side: request bytes to this connection's own backend connection, verbatim."""

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.pending.append(data)
        if len(self.pending) == 1:  # the first bytes: open the backend connection
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: Upstream(self), *self.backend)
        except OSError:
            self.transport.abort()
            return
        if self.closed:
            upstream.close()
            return
        self.upstream = upstream  # type: ignore[assignment]
        upstream.write(b"".join(self.pending))  # type: ignore[attr-defined]
        self.pending = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.upstream is not None:
            self.upstream.close()

    # The client reads slower than the backend answers: stop reading the backend.
    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()


class Pool:
    """Idle backend connections shared by all client connections, as edge's and nginx's pools are."""

    def __init__(self, backend: tuple[str, int], size: int = 256) -> None:  # edge's pool_size
        self.backend = backend
        self.size = size
        self.idle: list[PooledUpstream] = []

    def release(self, upstream: PooledUpstream) -> None:
        upstream.client = None
        upstream.transport.resume_reading()  # its last client may have paused it
        if len(self.idle) < self.size:
            self.idle.append(upstream)
        else:
            upstream.transport.close()


class PooledUpstream(asyncio.Protocol):
    """A pooled backend connection: relays verbatim (but for ``Connection``
    in the answer to a client's last request), and finds where each response
    ends (its Content-Length, all the benchmark backend sends) to know when
    the connection may serve another client."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.client: PooledRelay | None = None
        self.head = b""
        self.remaining = -1  # body bytes still to come; -1 while reading a head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # nothing asked: not a response to relay
            self.transport.close()
            return
        out = []
        while data:
            if self.remaining < 0:
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    break
                head, data, self.head = self.head[:end + 4], self.head[end + 4:], b""
                self.remaining = _content_length(head)
                if client.close_after and client.outstanding == 1:
                    # The client asked to close: the answer says so (RFC 9112 §9.6).
                    head = head.replace(b"\r\nConnection: keep-alive\r\n", b"\r\nConnection: close\r\n")
                out.append(head)
            taken = min(len(data), self.remaining)
            out.append(data[:taken])
            self.remaining -= taken
            data = data[taken:]
            if self.remaining == 0:
                self.remaining = -1
                client.transport.write(b"".join(out))
                out = []
                client.response_done()
        if out:
            client.transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.client is not None:
            self.client.transport.close()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()


def _content_length(head: bytes) -> int:
    at = head.lower().find(b"\r\ncontent-length:")
    return int(head[at + 17:head.find(b"\r\n", at + 17)]) if at >= 0 else 0


class PooledRelay(asyncio.Protocol):
    """The client side with a pool: request heads (GET, no body) go verbatim to
    a pooled backend connection, less ``Connection: close``, which this side
    honours itself by closing once the answer is relayed."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.upstream: PooledUpstream | None = None
        self.pending = b""
        self.waiting: list[bytes] = []  # heads sent before a backend connection is there
        self.outstanding = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while (end := self.pending.find(b"\r\n\r\n")) >= 0:
            head, self.pending = self.pending[:end + 4], self.pending[end + 4:]
            if b"\r\nConnection: close\r\n" in head:
                head = head.replace(b"\r\nConnection: close\r\n", b"\r\n")
                self.close_after = True
            self.outstanding += 1
            if self.upstream is not None:
                self.upstream.transport.write(head)
            elif self.pool.idle:
                self._attach(self.pool.idle.pop(), [head])
            else:
                self.waiting.append(head)
                if len(self.waiting) == 1:
                    asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(
                lambda: PooledUpstream(self.pool), *self.pool.backend)
        except OSError:
            self.transport.abort()
            return
        if self.transport.is_closing():
            self.pool.release(upstream)
            return
        self._attach(upstream, self.waiting)

    def _attach(self, upstream: PooledUpstream, heads: list[bytes]) -> None:
        self.upstream, self.waiting = upstream, []
        upstream.client = self
        upstream.transport.write(b"".join(heads))

    def response_done(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and self.close_after:
            self.transport.close()
            self._detach()

    def _detach(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        if self.outstanding or upstream.remaining >= 0 or upstream.head:
            upstream.client = None
            upstream.transport.close()  # mid-answer: not reusable
        else:
            self.pool.release(upstream)

    def connection_lost(self, exc: Exception | None) -> None:
        self._detach()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()


async def main(port: int, pem: Path, backend: tuple[str, int] | None, pooled: bool = False) -> None:
    ctx = contexts.build_context([pem.read_bytes()])
    factory: Callable[[], asyncio.Protocol] = Answer
    if backend is not None and pooled:
        pool = Pool(backend)
        factory = lambda: PooledRelay(pool)  # noqa: E731
    elif backend is not None:
        factory = lambda: Relay(backend)  # noqa: E731
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", port, ssl=ctx, backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--backend", type=_address, help="HOST:PORT: relay to it verbatim instead of answering")
    parser.add_argument("--pool", action="store_true", help="with --backend: pool backend connections across clients")
    args = parser.parse_args()
    bundle = args.cert.parent / f"ceiling-{args.port}.pem"
    bundle.write_bytes(args.cert.read_bytes() + args.key.read_bytes())
    bundle.chmod(0o600)
    uvloop.run(main(args.port, bundle, args.backend, args.pool))
