"""Memory of edge after many distinct client addresses (issue #14).

Each connection to edge's plain-HTTP listener starts with a PROXY v2 header
naming a new source address (10.0.0.0/8 then fd00::/8 beyond 16M), makes one
request, and closes. With ``connections_per_ip`` and
``requests_per_ip_per_second`` on, edge keeps per-address state for each
address it has seen: the RSS must level off (bounded LRU), not grow with N.

    python -m benchmarks.distinct_addresses --count 1000000 [--concurrency 64] [--maintenance]

Prints RSS (KiB) of the edge process every 10% and the growth from the first
10% to the end. Runs its own edge on a scratch directory.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from edge.tls import proxyproto
from tests.integration.conftest import EchoHandler, EdgeProcess


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def source(n: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + n)) if n < 1 << 24 else str(ipaddress.IPv6Address((0xFD << 120) + n))


async def one(port: int, n: int, request: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(proxyproto.v2((source(n), 1024 + n % 60000)) + request)
    data = await reader.read(200)
    writer.close()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


async def drive(port: int, pid: int, count: int, concurrency: int) -> dict:
    request = b"GET / HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n"
    counter = iter(range(count))
    statuses: dict[int, int] = {}
    samples: list[tuple[int, int]] = [(0, rss_kib(pid))]
    step = max(1, count // 10)

    async def worker() -> None:
        for n in counter:
            try:
                status = await one(port, n, request)
            except OSError:
                status = -1
            statuses[status] = statuses.get(status, 0) + 1
            if (n + 1) % step == 0:
                samples.append((n + 1, rss_kib(pid)))
                print(f"{n + 1} addresses: RSS {samples[-1][1]} KiB", file=sys.stderr, flush=True)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"count": count, "seconds": round(time.monotonic() - started, 1), "statuses": statuses,
            "rss_kib": samples, "growth_after_first_tenth_kib": samples[-1][1] - samples[1][1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--maintenance", action="store_true", help="edge answers 503 itself (faster)")
    args = parser.parse_args()
    backend = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as scratch:
        edge = EdgeProcess(Path(scratch), "[limits]\nconnections_per_ip = 20\nrequests_per_ip_per_second = 100\n")
        text = edge.config.read_text().replace('level = "debug"', 'level = "info"')
        edge.config.write_text(text.replace('admin = ""', 'admin = ""\nproxy_protocol = true\n'
                                            'trusted_proxies = ["127.0.0.1/32"]'))
        edge.start()
        try:
            # In maintenance: edge answers 503 itself, so the (Python) backend does not set the pace;
            # the per-address limits run before it, as for any request.
            edge.cli("apps-add", "demo", "--backend", f"127.0.0.1:{backend.server_address[1]}", "--no-force-https",
                     *(["--maintenance"] if args.maintenance else []))
            time.sleep(0.5)
            assert edge.proc is not None
            result = asyncio.run(drive(edge.http_port, edge.proc.pid, args.count, args.concurrency))
        finally:
            edge.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
