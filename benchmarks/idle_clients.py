"""Open N TLS connections to a proxy and hold them idle.

Prints "ready <n>" once every handshake is done, then waits until its
standard input closes. Used to measure the proxy's memory per idle TLS
connection.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import ssl
import sys

# An HTTP/2 client's opening (RFC 9113 §3.4): the preface and an empty SETTINGS.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def hold(port: int, count: int, server_name: str, h2: bool = False) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if h2:
        ctx.set_alpn_protocols(["h2"])
    limit = asyncio.Semaphore(200)  # handshakes in flight at once
    writers = []

    async def one() -> None:
        async with limit:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name)
            if h2:  # an idle HTTP/2 connection: preface sent, the server's SETTINGS read
                writer.write(H2_PREFACE)
                await reader.read(100)
            writers.append(writer)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"ready {len(writers)} failed {len(failed)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in writers:
        writer.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--server-name", default="bench.example.test")
    parser.add_argument("--h2", action="store_true", help="HTTP/2 connections (ALPN h2, preface sent)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.count + 100)), hard))
    asyncio.run(hold(args.port, args.count, args.server_name, args.h2))


if __name__ == "__main__":
    main()
