"""The ceiling of edge's stack: a uvloop TLS server doing nothing but TLS.

Same TLS settings and certificate as edge (``edge.tls.contexts``), an
``asyncio.Protocol`` that answers every request head with a fixed response
and no backend at all. Whatever edge does on top (reading the ClientHello,
picking a certificate, parsing, proxying) can only cost more, so this is the
most any proxy written on CPython's ``ssl`` and uvloop can reach. Run with
``--peers edge,nginx,uvloop-tls`` on the handshake and keep-alive scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
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


async def main(port: int, pem: Path) -> None:
    ctx = contexts.build_context([pem.read_bytes()])
    server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", port, ssl=ctx, backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    args = parser.parse_args()
    bundle = args.cert.parent / f"ceiling-{args.port}.pem"
    bundle.write_bytes(args.cert.read_bytes() + args.key.read_bytes())
    bundle.chmod(0o600)
    uvloop.run(main(args.port, bundle))
