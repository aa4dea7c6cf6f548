"""``workers = N``: a supervising process and N workers sharing the ports.

The supervisor loads the fixed TLS contexts *before* forking, so every worker
inherits the same listener context and with it the same session-ticket keys:
a client resumes its TLS session whichever worker it reaches next. It
resolves the listen addresses once (port 0 becomes a real port) by binding
without listening, then each worker binds the same ports with SO_REUSEPORT
and the kernel spreads connections over them. The supervisor restarts a
worker that dies and forwards SIGTERM, SIGINT and SIGHUP to them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from edge import logs
from edge.config import Address, Config
from edge.listen import check_free, warn_if_queues_are_dropped
from edge.server import FixedContexts, StartupError, load_fixed_contexts, serve
from edge.store.open import open_copy

log = logging.getLogger(__name__)

RESTART_BACKOFF = (0.1, 0.5, 1.0, 5.0)  # seconds before restarting a worker that keeps dying


def _resolve(addresses: tuple[Address, ...], holders: list[socket.socket], takeover: bool) -> tuple[Address, ...]:
    """Bind each address without listening to learn its port (for port 0)."""
    out = []
    for address in addresses:
        if not takeover:
            check_free(address)  # another edge holds it: say so, do not share it
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
        holders.append(sock)  # kept bound (not listening) so the port stays ours
        out.append(Address(address.host, sock.getsockname()[1]))
    return tuple(out)


def _worker(config: Config, fixed: FixedContexts, number: int) -> None:
    """The body of a forked worker; never returns."""
    import uvloop

    code = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        log.info("worker %d (pid %d) starting", number, os.getpid())
        # The admin API (one port, no SO_REUSEPORT) is served by the first worker.
        uvloop.run(serve(config, fixed=fixed, reuse_port=True, serve_admin=number == 0))
    except StartupError as exc:
        print(f"edge: error: worker {number}: {exc}", file=sys.stderr)
        code = 3
    except BaseException:  # the worker must exit, never fall back into the supervisor's code
        log.exception("worker %d crashed", number)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def _prepare(config: Config) -> None:
    if config.server.takeover:
        warn_if_queues_are_dropped()
    # Check (and rebuild, if damaged) the host's local copy once, before any
    # worker opens it; closed before forking: an LMDB handle must not cross a fork.
    prepared = open_copy(config, rebuild=True)
    if prepared is not None:
        prepared.close()


def supervise(config: Config) -> int:
    holders: list[socket.socket] = []
    server = dataclasses.replace(
        config.server,
        https=_resolve(config.server.https, holders, config.server.takeover),
        http=_resolve(config.server.http, holders, config.server.takeover),
    )
    config = dataclasses.replace(config, server=server)
    fixed = load_fixed_contexts(config)
    _prepare(config)
    # Workers publish their counters here; the one serving /metrics sums them.
    metrics_dir = tempfile.mkdtemp(prefix="edge-metrics-")
    os.environ["EDGE_METRICS_DIR"] = metrics_dir

    children: dict[int, int] = {}  # pid -> worker number
    failures: dict[int, int] = {}  # worker number -> quick deaths in a row
    stopping = False
    startup_failed = False
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, on_signal)

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:
            _worker(config, fixed, number)
        children[pid] = number

    for number in range(config.server.workers):
        start(number)
    log.info("supervisor (pid %d) running %d workers", os.getpid(), config.server.workers)
    started_at: dict[int, float] = {n: time.monotonic() for n in range(config.server.workers)}

    while children:
        while received:
            signum = received.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                stopping = True
            elif signum == signal.SIGUSR1:
                logs.reopen()
            for pid in children:
                try:
                    os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
                except ProcessLookupError:
                    pass
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        number = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        if code == 3:
            # A start-up error (bad certificate, port taken): restarting cannot help.
            stopping = startup_failed = True
            for other in children:
                os.kill(other, signal.SIGTERM)
            continue
        lived = time.monotonic() - started_at.get(number, 0.0)
        failures[number] = failures.get(number, 0) + 1 if lived < 10 else 0
        delay = RESTART_BACKOFF[min(failures[number], len(RESTART_BACKOFF) - 1)]
        log.error("worker %d (pid %d) exited with %d; restarting in %.1fs", number, pid, code, delay)
        time.sleep(delay)
        started_at[number] = time.monotonic()
        start(number)
    for sock in holders:
        sock.close()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if startup_failed else 0
