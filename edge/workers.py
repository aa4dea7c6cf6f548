"""``workers = N``: a supervising process and N workers sharing the ports.

The supervisor loads the fixed TLS contexts *before* forking, so every worker
inherits the same listener context and with it the same session-ticket keys:
a client resumes its TLS session whichever worker it reaches next. It opens
the listening sockets too, N per address with SO_REUSEPORT (the kernel
spreads connections over them), and keeps them: a worker that dies is
restarted on the same sockets, so the connections queued for it wait instead
of being reset, and an upgrade (``serve --takeover``) receives them all from
the supervisor (edge.takeover). It restarts a worker that dies and forwards
SIGTERM, SIGINT and SIGHUP to them.

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
import select
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from edge import logs
from edge.config import Config
from edge.listen import for_worker, open_listeners
from edge.server import Edge, FixedContexts, StartupError, load_fixed_contexts
from edge.store.base import StoreError
from edge.store.open import open_copy
from edge.takeover import Listener, Offer, offer_path

log = logging.getLogger(__name__)

RESTART_BACKOFF = (0.1, 0.5, 1.0, 5.0)  # seconds before restarting a worker that keeps dying


def _worker(config: Config, fixed: FixedContexts, number: int, metrics_dir: Path,
            listeners: list[Listener], offer: Offer | None) -> None:
    """The body of a forked worker; never returns."""
    import uvloop

    code = 0
    try:
        if offer is not None:
            offer.forget()  # the supervisor's
        mine = for_worker(listeners, number, config.server.workers)
        for item in listeners:
            if item not in mine:
                item.sock.close()  # the other workers' (the supervisor keeps every one)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        log.info("worker %d (pid %d) starting", number, os.getpid())
        # The admin API (one port, no SO_REUSEPORT) is served by the first worker.
        uvloop.run(serve(config, fixed=fixed, reuse_port=True, serve_admin=number == 0, metrics_dir=metrics_dir,
                         listeners=mine))
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
    # Check (and rebuild, if damaged) the host's local copy once, before any
    # worker opens it; closed before forking: an LMDB handle must not cross a fork.
    prepared = open_copy(config, rebuild=True)
    prepared.close()
    if prepared.path != config.store.index_dir:  # a stand-in for this run: every worker opens that one
        config = dataclasses.replace(config, store=dataclasses.replace(config.store, index_path=prepared.path))
    return config


def supervise(config: Config) -> int:
    listeners = open_listeners(config, config.server.workers)
    try:
        fixed = load_fixed_contexts(config)
        config = _prepare(config)
    except BaseException:
        for item in listeners:
            item.sock.close()
        raise
    supervisor = _Supervisor(config, fixed, listeners)
    try:
        return supervisor.run()
    finally:
        supervisor.close()


class _Supervisor:
    """The fork-and-wait loop: no event loop, no store, no LMDB handle."""

    def __init__(self, config: Config, fixed: FixedContexts, listeners: list[Listener]) -> None:
        self.config = config
        self.fixed = fixed
        self.listeners = listeners
        self.offer = Offer.open(offer_path(config), listeners)
        # Workers publish their counters here; the one serving /metrics sums them.
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="edge-metrics-"))
        self.children: dict[int, int] = {}  # pid -> worker number
        self.failures: dict[int, int] = {}  # worker number -> quick deaths in a row
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self.startup_failed = False
        self.received: list[int] = []

    def start(self, number: int) -> None:
        self.started_at[number] = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _worker(self.config, self.fixed, number, self.metrics_dir, self.listeners, self.offer)
        self.children[pid] = number

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda signum, _frame: self.received.append(signum))
        for number in range(self.config.server.workers):
            self.start(number)
        log.info("supervisor (pid %d) running %d workers", os.getpid(), self.config.server.workers)
        while self.children:
            while self.received:
                self.forward(self.received.pop(0))
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                _wait_a_little(self.offer)
            else:
                self.reap(pid, os.waitstatus_to_exitcode(status))
        return 1 if self.startup_failed else 0

    def forward(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            if self.offer is not None:  # a successor from now on takes the ports from the one running
                self.offer.close()
                self.offer = None
        elif signum == signal.SIGUSR1:
            logs.reopen()
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    def reap(self, pid: int, code: int) -> None:
        number = self.children.pop(pid)
        if self.stopping:
            return
        if code == 3:
            # A start-up error (bad certificate, port taken): restarting cannot help.
            self.stopping = self.startup_failed = True
            for other in self.children:
                os.kill(other, signal.SIGTERM)
            return
        lived = time.monotonic() - self.started_at.get(number, 0.0)
        self.failures[number] = self.failures.get(number, 0) + 1 if lived < 10 else 0
        delay = RESTART_BACKOFF[min(self.failures[number], len(RESTART_BACKOFF) - 1)]
        log.error("worker %d (pid %d) exited with %d; restarting in %.1fs", number, pid, code, delay)
        time.sleep(delay)
        self.start(number)  # on the same listening sockets: what was queued for it waits

    def close(self) -> None:
        if self.offer is not None:
            self.offer.close()
        for item in self.listeners:
            item.sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _wait_a_little(offer: Offer | None) -> None:
    """Sleep 50 ms, handing the listeners to a successor that asks meanwhile."""
    if offer is None:
        time.sleep(0.05)
    elif select.select([offer.fileno()], [], [], 0.05)[0]:
        offer.answer()


def _log_failure(task: asyncio.Task[None]) -> None:
    """A signal's work that failed says why (a task's exception is otherwise lost)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_coro().__qualname__, exc_info=task.exception())


async def serve(
    config: Config, fixed: FixedContexts | None = None, reuse_port: bool = False, serve_admin: bool = True,
    metrics_dir: Path | None = None, listeners: list[Listener] | None = None,
) -> None:
    try:
        edge = Edge(config, fixed=fixed, reuse_port=reuse_port, serve_admin=serve_admin, metrics_dir=metrics_dir,
                    listeners=listeners)
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
