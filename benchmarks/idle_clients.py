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


async def hold(port: int, count: int, server_name: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    limit = asyncio.Semaphore(200)  # handshakes in flight at once
    writers = []

    async def one() -> None:
        async with limit:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name)
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
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.count + 100)), hard))
    asyncio.run(hold(args.port, args.count, args.server_name))


if __name__ == "__main__":
    main()
