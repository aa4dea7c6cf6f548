"""An upgrade under load (issue #13): how many connections are refused or
reset, and requests failed, while a new edge takes over the ports and the
old one drains.

    python -m benchmarks.upgrade                       # takeover and plain restart, tcp_migrate_req 0 and 1
    python -m benchmarks.upgrade --modes takeover --migrate 1 --workers 2

Load: wrk on the load core, ``--connections`` clients each sending
``Connection: close`` requests, so every request is a new TCP connection and
a new TLS handshake (the connections an upgrade can refuse or reset). After
``--before`` seconds the upgrade runs as deploy/OPERATIONS.md says:

- ``takeover``: ``edge serve --takeover`` (same configuration, store and local
  copy), which receives the old one's listening sockets (edge.takeover), until
  it logs "edge serving", then SIGTERM to the old one, which stops accepting
  and drains;
- ``beside``: the same with the old one's offer removed first, as with an
  edge that hands over no sockets: the new one binds the ports beside it
  (SO_REUSEPORT), and what is queued on the old one's sockets when it closes
  them is reset unless ``tcp_migrate_req`` moves it;
- ``restart``: SIGTERM to the old one, then the new one started once the old
  one exited (``systemctl restart``), for comparison.

``--migrate 0,1`` runs each mode in a private network namespace (``unshare -n``)
with ``net.ipv4.tcp_migrate_req`` set to that value, so the host's setting is
neither needed nor changed. wrk counts a refused connection, and one reset
before its TLS handshake ended, as a connect error; one reset later as a read error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.certs import bench_certificates
from benchmarks.systems import BENCH_HOST, EDGE_BIN, LOAD_CORE, PROXY_CORE, Backend, edge_conf, free_port, wait_port
from edge.takeover import OFFER_NAME


def _wrk(port: int, connections: int, duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{round(duration)}s",
         "--timeout", "10s", "-H",
         f"Host: {BENCH_HOST}", "-H", "Connection: close", f"https://127.0.0.1:{port}/small"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wrk_result(out: str) -> dict[str, int]:
    requests = re.search(r"(\d+) requests in", out)
    if requests is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    connect, read, write, timeout = (int(x) for x in errors.groups()) if errors else (0, 0, 0, 0)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": int(requests.group(1)), "connect_errors": connect, "read_errors": read,
            "write_errors": write, "timeouts": timeout, "non_2xx": int(bad.group(1)) if bad else 0}


def slow_clients(port: int, threads: int, delay: float, stop: threading.Event) -> dict[str, int]:
    """Clients that wait ``delay`` s between connecting and sending their
    ClientHello, as a client one round trip away does: edge listens with
    TCP_DEFER_ACCEPT, so such a connection waits in the kernel (not yet in the
    accept queue) and is reset if the listener it reached closes meanwhile,
    unless the kernel migrates it (``tcp_migrate_req``). Loopback has no round
    trip to speak of; this gives it one."""
    counts = {"requests": 0, "refused": 0, "reset": 0, "other_errors": 0}
    lock = threading.Lock()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def one() -> str:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                time.sleep(delay)
                with ctx.wrap_socket(raw, server_hostname=BENCH_HOST) as tls:
                    tls.sendall(f"GET /small HTTP/1.1\r\nHost: {BENCH_HOST}\r\nConnection: close\r\n\r\n".encode())
                    head = tls.recv(64)
        except ConnectionRefusedError:
            return "refused"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except (OSError, ssl.SSLError):
            return "other_errors"
        return "requests" if head.startswith(b"HTTP/1.1 200") else "other_errors"

    def loop() -> None:
        while not stop.is_set():
            outcome = one()
            with lock:
                counts[outcome] += 1

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return counts


def _wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} in {log}:\n{log.read_text(errors='replace')[-1500:]}")
        time.sleep(0.02)
    return time.monotonic()


class Upgrade:
    def __init__(self, workdir: Path, backend_port: int, workers: int, slow: int, delay: float) -> None:
        self.slow, self.delay = slow, delay  # clients one simulated round trip away (``slow_clients``)
        self.root = workdir / "edge"
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.port = free_port()
        self.config = edge_conf(self.root, self.port, workers=workers, admin_port=free_port())
        # "edge serving" is logged at info: the successor is waited for on it.
        self.config.write_text(self.config.read_text().replace('level = "warning"', 'level = "info"'))
        certs = bench_certificates()
        cli = [EDGE_BIN, "--config", str(self.config)]
        subprocess.run([*cli, "apps-add", "bench", "--backend", f"127.0.0.1:{backend_port}"], check=True,
                       capture_output=True)
        subprocess.run([*cli, "domains-add", BENCH_HOST, "--app", "bench", "--cert", str(certs.ecdsa_cert), "--key",
                        str(certs.ecdsa_key)], check=True, capture_output=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(["taskset", "-c", PROXY_CORE, EDGE_BIN, "serve", "--config", str(self.config),
                                     *extra], stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def run(self, mode: str, connections: int, before: float, after: float) -> dict[str, object]:
        old, old_log = self.spawn("old")
        # The whole store in its index, not just serving: wrk sends no SNI, so
        # before that a worker that has not read the name yet answers 503 (a
        # first start's "loading"), which is not what an upgrade measures.
        _wait_log(old_log, "store loaded:", old)
        wait_port(self.port)
        load = _wrk(self.port, connections, 600)  # stopped (SIGINT: it prints its figures) once done
        stop = threading.Event()
        slow: dict[str, int] = {}
        slow_thread = threading.Thread(target=lambda: slow.update(slow_clients(self.port, self.slow, self.delay, stop)))
        slow_thread.start()
        time.sleep(before)
        began = time.monotonic()
        if mode in ("takeover", "beside"):
            if mode == "beside":
                (self.root / "index" / OFFER_NAME).unlink()
            new, new_log = self.spawn("new", "--takeover")
            serving = _wait_log(new_log, "edge serving", new)
            old.send_signal(signal.SIGTERM)
            old.wait(60)
            drained = time.monotonic()
        else:
            old.send_signal(signal.SIGTERM)
            old.wait(60)
            drained = time.monotonic()
            new, new_log = self.spawn("new")
            serving = _wait_log(new_log, "edge serving", new)
        time.sleep(after)
        load.send_signal(signal.SIGINT)
        stop.set()
        out, _ = load.communicate(timeout=60)
        slow_thread.join()
        if os.environ.get("EDGE_BENCH_DEBUG"):
            print(out, old_log.read_text()[-3000:], new_log.read_text()[-3000:], file=sys.stderr)
        new.send_signal(signal.SIGTERM)
        new.wait(60)
        result: dict[str, object] = {"mode": mode, "connections": connections, **_wrk_result(out),
                                     "new_serving_after_s": serving - began, "old_gone_after_s": drained - began,
                                     **{f"slow_{k}": v for k, v in slow.items()},
                                     "warned_migrate": "tcp_migrate_req" in new_log.read_text(errors="replace"),
                                     "handed_over": "took over" in new_log.read_text(errors="replace")}
        return result

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def measure(modes: list[str], workers: int, connections: int, slow: int, delay: float, before: float,
            after: float) -> list[dict[str, object]]:
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # the slow clients' threads: off the proxy's core
    out = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-upgrade-") as tmp:
        backend = Backend("backend", Path(tmp), 0, bench_certificates())
        backend.start()
        try:
            for mode in modes:
                upgrade = Upgrade(Path(tmp), backend.port, workers, slow, delay)
                try:
                    row = upgrade.run(mode, connections, before, after)
                finally:
                    upgrade.close()
                row.update({"tcp_migrate_req": migrate, "workers": workers})
                out.append(row)
        finally:
            backend.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="refused and failed connections across an edge upgrade")
    parser.add_argument("--modes", default="takeover,beside,restart")
    parser.add_argument("--migrate", default="0,1",
                        help="net.ipv4.tcp_migrate_req values, each in a private network namespace; "
                             "'host': the host's namespace as it is")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--slow", type=int, default=50, help="clients sending their ClientHello --delay late")
    parser.add_argument("--delay", type=float, default=0.1, help="seconds from connect to ClientHello (slow clients)")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before the upgrade")
    parser.add_argument("--after", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="(internal) print rows as JSON, in this namespace")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if args.json or args.migrate == "host":
        rows = [row for _ in range(args.rounds)
                for row in measure(modes, args.workers, args.connections, args.slow, args.delay, args.before,
                                       args.after)]
        if args.json:
            print(json.dumps(rows))
            return 0
    else:
        rows = []
        for value in args.migrate.split(","):
            inner = [sys.executable, "-m", "benchmarks.upgrade", "--json", "--modes", args.modes,
                     "--workers", str(args.workers), "--connections", str(args.connections), "--slow", str(args.slow),
                     "--delay", str(args.delay),
                     "--before", str(args.before), "--after", str(args.after), "--rounds", str(args.rounds)]
            script = (f"ip link set lo up && sysctl -q -w net.ipv4.tcp_migrate_req={int(value)} && "
                      + " ".join(inner))
            done = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True,
                                  cwd=Path(__file__).parent.parent, env=os.environ)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-3000:], file=sys.stderr)
                return 1
            rows += json.loads(done.stdout.strip().splitlines()[-1])
    print("| mode | workers | tcp_migrate_req | wrk requests | wrk connect errors (refused, or reset in the handshake) "
          "| wrk read errors (reset) "
          "| wrk write errors, timeouts, non-2xx | slow-hello requests | slow refused | slow reset | slow other "
          "| new serving after, s | old gone after, s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        row["wrk_other"] = f"{row['write_errors']}, {row['timeouts']}, {row['non_2xx']}"
        print("| " + " | ".join(str(row[k]) if not isinstance(row[k], float) else f"{row[k]:.2f}" for k in (
            "mode", "workers", "tcp_migrate_req", "requests", "connect_errors", "read_errors", "wrk_other",
            "slow_requests", "slow_refused", "slow_reset", "slow_other_errors", "new_serving_after_s",
            "old_gone_after_s")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
