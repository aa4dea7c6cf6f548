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

Run with ``--peers edge,nginx,uvloop-tls,uvloop-relay`` on the handshake and
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

    # The client reads slower than the backend answers: stop sending to it.
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

    # The backend reads slower than the client sends: stop reading the client.
    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()


async def main(port: int, pem: Path, backend: tuple[str, int] | None) -> None:
    ctx = contexts.build_context([pem.read_bytes()])
    factory: Callable[[], asyncio.Protocol] = Answer if backend is None else lambda: Relay(backend)
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
    args = parser.parse_args()
    bundle = args.cert.parent / f"ceiling-{args.port}.pem"
    bundle.write_bytes(args.cert.read_bytes() + args.key.read_bytes())
    bundle.chmod(0o600)
    uvloop.run(main(args.port, bundle, args.backend))
