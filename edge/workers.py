"""``workers = N``: a supervising process and N workers sharing the ports.

The supervisor loads the fixed TLS contexts *before* forking, so every worker
inherits the same listener context and with it the same session-ticket keys:
a client resumes its TLS session whichever worker it reaches next. It
resolves the listen addresses once (port 0 becomes a real port) by binding
without listening, then each worker binds the same ports with SO_REUSEPORT
and the kernel spreads connections over them. The supervisor restarts a
worker that dies and forwards SIGTERM, SIGINT and SIGHUP to them.

The first worker writes the host's local copy (the index every worker reads,
``edge.store.shared``), as it runs the admin API and ACME; the others only
read it. Not the supervisor: it stays a plain fork-and-wait loop, with no
event loop, no store connection and no open LMDB environment, which must not
cross the forks it makes whenever a worker dies; and a writer that dies is
restarted like any worker and resumes from the copy (every change is one
transaction), while the other workers keep serving from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from edge import logs
from edge.config import Address, Config
from edge.listen import bind, warn_if_queues_are_dropped
from edge.server import Edge, FixedContexts, StartupError, load_fixed_contexts
from edge.store.base import StoreError
from edge.store.open import open_copy

log = logging.getLogger(__name__)

RESTART_BACKOFF = (0.1, 0.5, 1.0, 5.0)  # seconds before restarting a worker that keeps dying


def _resolve(addresses: tuple[Address, ...], holders: list[socket.socket], takeover: bool) -> tuple[Address, ...]:
    """Bind each address without listening to learn its port (for port 0)."""
    out = []
    for address in addresses:
        # Without --takeover a port another edge holds is refused, not shared.
        sock = bind(address, probe=not takeover, listen=False)
        holders.append(sock)  # kept bound (not listening) so the port stays ours
        out.append(Address(address.host, sock.getsockname()[1]))
    return tuple(out)


def _worker(config: Config, fixed: FixedContexts, number: int, metrics_dir: Path) -> None:
    """The body of a forked worker; never returns."""
    import uvloop

    code = 0
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        log.info("worker %d (pid %d) starting", number, os.getpid())
        # The admin API (one port, no SO_REUSEPORT) is served by the first worker.
        uvloop.run(serve(config, fixed=fixed, reuse_port=True, serve_admin=number == 0, metrics_dir=metrics_dir))
    except StartupError as exc:
        print(f"edge: error: worker {number}: {exc}", file=sys.stderr)
        code = 3
    except BaseException:  # the worker must exit, never fall back into the supervisor's code
        log.exception("worker %d crashed", number)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def _prepare(config: Config) -> Config:
    if config.server.takeover:
        warn_if_queues_are_dropped()
    # Check (and rebuild, if damaged) the host's local copy once, before any
    # worker opens it; closed before forking: an LMDB handle must not cross a fork.
    prepared = open_copy(config, rebuild=True)
    prepared.close()
    if prepared.path != config.store.index_dir:  # a stand-in for this run: every worker opens that one
        config = dataclasses.replace(config, store=dataclasses.replace(config.store, index_path=prepared.path))
    return config


def supervise(config: Config) -> int:
    holders: list[socket.socket] = []
    server = dataclasses.replace(
        config.server,
        https=_resolve(config.server.https, holders, config.server.takeover),
        http=_resolve(config.server.http, holders, config.server.takeover),
    )
    config = dataclasses.replace(config, server=server)
    fixed = load_fixed_contexts(config)
    config = _prepare(config)
    # Workers publish their counters here; the one serving /metrics sums them.
    metrics_dir = Path(tempfile.mkdtemp(prefix="edge-metrics-"))

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
            _worker(config, fixed, number, metrics_dir)
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


def _log_failure(task: asyncio.Task[None]) -> None:
    """A signal's work that failed says why (a task's exception is otherwise lost)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_coro().__qualname__, exc_info=task.exception())


async def serve(
    config: Config, fixed: FixedContexts | None = None, reuse_port: bool = False, serve_admin: bool = True,
    metrics_dir: Path | None = None,
) -> None:
    try:
        edge = Edge(config, fixed=fixed, reuse_port=reuse_port, serve_admin=serve_admin, metrics_dir=metrics_dir)
        await edge.start()
    except StoreError as exc:
        raise StartupError(str(exc)) from None
    loop = asyncio.get_running_loop()
    background: set[asyncio.Task[None]] = set()

    def spawn(coro) -> None:
        task = loop.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)
        task.add_done_callback(_log_failure)

    def on_term() -> None:
        if not edge.stopping:
            log.info("stopping")
            spawn(edge.stop())

    async def reload() -> None:
        await edge.reload_config()
        await edge.reload_store()

    def on_hup() -> None:
        log.info("SIGHUP: reloading the configuration and the store")
        spawn(reload())

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, logs.reopen)
    await edge.wait_stopped()
