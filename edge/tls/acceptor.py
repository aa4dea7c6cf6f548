"""The TLS listener: accept, peek the ClientHello, get the context, hand over.

Why not a plain ``create_server(ssl=...)`` with an ``sni_callback``: the
callback runs inside ``do_handshake`` on the event-loop thread and cannot
await, so a cold name would build its context (~1 ms of OpenSSL work, plus a
store read) while every other connection waits. Instead:

1. accept the raw socket;
2. read the ClientHello with ``MSG_PEEK`` (the bytes stay in the kernel for
   the TLS stack) and parse SNI and ALPN (``clienthello.parse``);
3. select the certificate (``Selector``) and fetch its context from the
   cache, building it in a thread pool on a miss;
4. pin it under the name, and start TLS with the *listener* context, whose
   ``sni_callback`` swaps in the pinned context (one dict lookup).

Handshakes run with the listener context so its session-ticket keys, made
once before workers fork, are shared: resumption works across workers.
TLS versions and options come from the listener; certificate, ALPN and TLS
1.2 ciphers from the swapped-in context.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edge.store.base import StoreError
from edge.tls import clienthello, contexts, names
from edge.tls.contexts import ContextBuildError, ContextCache
from edge.tls.selector import Choice, Selector, Source

log = logging.getLogger(__name__)

# RFC 8446 §6: a fatal unrecognized_name(112) alert in a TLS 1.0-compatible
# record, sent raw before closing when strict SNI refuses a name.
_ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x01\x00\x02\x02\x70"
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nConnection: close\r\n"
    b"Content-Length: 77\r\n\r\n"
    b"<html><body><h1>400 Plain HTTP request sent to HTTPS port</h1></body></html>\n"
)
_PEEK_SIZE = clienthello.MAX_CLIENT_HELLO + 5 * 4
_ACME_TLS = b"acme-tls/1"  # RFC 8737 §6.2: the ALPN protocol of TLS-ALPN-01 validation
# A ClientHello split over several TCP segments: poll again after these delays
# (level-triggered readiness would otherwise spin while the bytes sit unread).
_PEEK_BACKOFF = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the data path learns of the handshake."""

    server_name: str | None  # canonical SNI name, None when absent or invalid
    source: Source
    alpn: tuple[bytes, ...]


ProtocolFactory = Callable[[TlsInfo], asyncio.BaseProtocol]


HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _ClosingProtocol(asyncio.Protocol):
    """After a TLS-ALPN-01 handshake: close (RFC 8737 §3, no application data)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class HandshakeStats:
    """Counters for the metrics module to read at scrape time; no label whose
    values grow with the number of names."""

    def __init__(self) -> None:
        self.completed: dict[tuple[str, str], int] = {}  # (TLS version, certificate source) -> count
        self.failed: dict[str, int] = {}
        self.refused_sni = 0
        self.unknown_sni = 0  # a name was sent that no certificate covers: served the default
        self.not_tls = 0
        self.duration_buckets = [0] * (len(HANDSHAKE_BUCKETS) + 1)
        self.duration_sum = 0.0

    def done(self, version: str, source: Source, seconds: float) -> None:
        key = (version, source.value)
        self.completed[key] = self.completed.get(key, 0) + 1
        self.duration_buckets[bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1


class TlsAcceptor:
    def __init__(
        self,
        *,
        listener_context: ssl.SSLContext,
        platform_context: ssl.SSLContext,
        selector: Selector,
        cache: ContextCache,
        handshake_timeout: float,
        challenge_certificate: Callable[[str], Awaitable[bytes | None]] | None = None,
        fetch_name: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        # The listener context holds the default certificate (no SNI, unknown names).
        self.listener_context = listener_context
        self.platform_context = platform_context
        self.selector = selector
        self.cache = cache
        self.handshake_timeout = handshake_timeout
        # TLS-ALPN-01: the validation certificate of a name, from the store.
        self.challenge_certificate = challenge_certificate
        # While the store loads in the background: read a name's entries before selecting.
        self.fetch_name = fetch_name
        self._index = selector.index
        self.stats = HandshakeStats()
        # name -> [context, number of handshakes in flight using it]
        self._pins: dict[str, list] = {}
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()
        self._peeking: set[socket.socket] = set()
        listener_context.sni_callback = self._sni_callback

    # --- listening -----------------------------------------------------------
    def listen(self, sock: socket.socket, protocol_factory: ProtocolFactory) -> None:
        """Accept TLS connections on ``sock``; ``protocol_factory`` makes their protocol."""
        sock.setblocking(False)
        # Wake accept() only once the client has sent data (its ClientHello), as
        # nginx's "deferred" does: the peek then succeeds at once, without an
        # extra epoll registration and wake-up per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, int(self.handshake_timeout)))
        self._listeners.append(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_ready, sock, protocol_factory)

    def stop_listening(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()

    def close_pending(self) -> None:
        """Drop connections still before or inside their handshake (shutdown)."""
        loop = asyncio.get_running_loop()
        for sock in list(self._peeking):
            loop.remove_reader(sock.fileno())
            sock.close()
        self._peeking.clear()
        for task in list(self._tasks):
            task.cancel()

    def _accept_ready(self, listener: socket.socket, factory: ProtocolFactory) -> None:
        # Accept a bounded batch per wake-up so one busy listener cannot starve the loop.
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, retry on the next wake-up
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._peek(sock, factory, 0, asyncio.get_running_loop().time() + self.handshake_timeout)

    # --- ClientHello -----------------------------------------------------------
    def _peek(self, sock: socket.socket, factory: ProtocolFactory, attempt: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = sock.recv(_PEEK_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self._wait_readable(sock, factory, attempt, deadline)
            return
        except OSError:
            self._drop(sock)
            return
        if not data:
            self._drop(sock)  # closed before saying anything
            return
        try:
            hello = clienthello.parse(data)
        except clienthello.NeedMore:
            if loop.time() >= deadline:
                self.stats.fail("timeout")
                self._drop(sock)
                return
            self._peeking.add(sock)
            delay = _PEEK_BACKOFF[min(attempt, len(_PEEK_BACKOFF) - 1)]
            loop.call_later(delay, self._peek_again, sock, factory, attempt + 1, deadline)
            return
        except clienthello.NotClientHello:
            self.stats.not_tls += 1
            if data[:1].isalpha():
                # Plain HTTP on the TLS port: say so, as nginx does (its 497).
                try:
                    sock.send(_PLAIN_HTTP_ANSWER)
                except OSError:
                    pass
            self._drop(sock)
            return
        self._peeking.discard(sock)
        self._start(sock, factory, hello)

    def _peek_again(self, sock: socket.socket, factory: ProtocolFactory, attempt: int, deadline: float) -> None:
        if sock in self._peeking:
            self._peek(sock, factory, attempt, deadline)

    def _wait_readable(self, sock: socket.socket, factory: ProtocolFactory, attempt: int, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        self._peeking.add(sock)
        fd = sock.fileno()

        def ready() -> None:
            loop.remove_reader(fd)
            timer.cancel()
            if sock in self._peeking:
                self._peek(sock, factory, attempt, deadline)

        def expired() -> None:
            loop.remove_reader(fd)
            self.stats.fail("timeout")
            self._drop(sock)

        loop.add_reader(fd, ready)
        timer = loop.call_at(deadline, expired)

    def _drop(self, sock: socket.socket) -> None:
        self._peeking.discard(sock)
        sock.close()

    # --- handshake -----------------------------------------------------------------
    def _start(self, sock: socket.socket, factory: ProtocolFactory, hello: clienthello.ClientHello,
               fetched: bool = False) -> None:
        name = names.normalize(hello.server_name)
        if _ACME_TLS in hello.alpn:
            self._spawn(self._acme_tls(sock, name))
            return
        if (self._index.loading and not fetched and name is not None and self.fetch_name is not None
                and name not in self._index.fetched):
            self._spawn(self._fetch_then_start(sock, factory, hello, name))
            return
        choice = self.selector.select(name)
        if choice is not None and name is not None and choice.source is Source.DEFAULT:
            self.stats.unknown_sni += 1
        if choice is None:
            self.stats.refused_sni += 1
            try:
                sock.send(_ALERT_UNRECOGNIZED_NAME)
            except OSError:
                pass
            sock.close()
            return
        if choice.source is Source.DEFAULT:
            ctx: ssl.SSLContext | None = self.listener_context
        elif choice.source is Source.PLATFORM:
            ctx = self.platform_context
        else:
            ctx = self.cache.get_nowait(choice.cache_key)
        if ctx is None:
            # A cold name: build its context off the loop, then hand over.
            self._spawn(self._cold(sock, factory, name, hello, choice))
            return
        self._handover(sock, factory, name, hello, choice, ctx)

    async def _fetch_then_start(self, sock: socket.socket, factory: ProtocolFactory,
                                hello: clienthello.ClientHello, name: str) -> None:
        assert self.fetch_name is not None
        try:
            await asyncio.wait_for(self.fetch_name(name), self.handshake_timeout)
        except (StoreError, OSError, TimeoutError) as exc:
            log.error("reading %s from the store failed: %s; selecting from what is loaded", name, exc)
        self._start(sock, factory, hello, fetched=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _acme_tls(self, sock: socket.socket, name: str | None) -> None:
        """Answer a TLS-ALPN-01 validation (RFC 8737 §3): the handshake is the answer.

        The ACME server offers only ``acme-tls/1`` and expects the validation
        certificate of the name, which the ordering node (any node) put in the
        store; after the handshake nothing more is said."""
        pem = None
        if name is not None and self.challenge_certificate is not None:
            try:
                pem = await self.challenge_certificate(name)
            except (StoreError, OSError) as exc:
                log.error("TLS-ALPN-01 answer for %s unavailable: %s", name, exc)
        if pem is None:
            # No challenge of ours: refuse, as the protocol is not one we serve (RFC 7301 §3.2).
            log.info("TLS-ALPN-01 validation for %s, but no challenge is pending", name)
            self.stats.fail("acme_tls")
            sock.close()
            return
        try:
            ctx = await asyncio.get_running_loop().run_in_executor(None, contexts.build_context, [pem])
        except ContextBuildError as exc:
            log.error("TLS-ALPN-01 answer for %s is unusable: %s", name, exc)
            sock.close()
            return
        ctx.set_alpn_protocols([_ACME_TLS.decode()])
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                _ClosingProtocol, sock, ssl=ctx, ssl_handshake_timeout=self.handshake_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.info("TLS-ALPN-01 handshake for %s failed: %s", name, exc)
            sock.close()
            return
        log.info("TLS-ALPN-01 validation certificate served for %s", name)

    async def _cold(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        name: str | None,
        hello: clienthello.ClientHello,
        choice: Choice,
    ) -> None:
        try:
            ctx = await asyncio.wait_for(self.cache.get(choice.cache_key), self.handshake_timeout)
        except (ContextBuildError, StoreError, OSError, TimeoutError, ValueError) as exc:
            # A stored bundle OpenSSL refuses (edited by hand) or a store that
            # went away: fall through to the default certificate, as for an
            # unknown name, rather than failing the handshake.
            log.error("no TLS context for %s (%s): %s; serving the default certificate",
                      name, choice.source.value, exc)
            self.stats.fail("context")
            if self.selector.strict_sni:
                sock.close()
                return
            ctx = self.listener_context
        self._handover(sock, factory, name, hello, choice, ctx)

    def _handover(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        name: str | None,
        hello: clienthello.ClientHello,
        choice: Choice,
        ctx: ssl.SSLContext,
    ) -> None:
        """Pin ``ctx`` for the SNI callback and start the TLS handshake.

        No coroutine of ours wraps it: the hot path is one task (uvloop's
        ``connect_accepted_socket``) and a done callback.
        """
        info = TlsInfo(name, choice.source, hello.alpn)
        # The listener context needs no swap: nothing to pin.
        pinned = name if name is not None and ctx is not self.listener_context else None
        if pinned is not None:
            pin = self._pins.get(pinned)
            if pin is None or pin[0] is not ctx:
                # A newer context replaces an older pin: handshakes already
                # past their callback keep the one they got.
                self._pins[pinned] = pin = [ctx, 0]
            pin[1] += 1
        task = asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().connect_accepted_socket(
                lambda: factory(info),
                sock,
                ssl=self.listener_context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        )
        self._tasks.add(task)
        started = asyncio.get_running_loop().time()
        task.add_done_callback(lambda done: self._handshake_done(done, sock, pinned, ctx, choice.source, started))

    def _handshake_done(
        self, task: asyncio.Task, sock: socket.socket, pinned: str | None, ctx: ssl.SSLContext, source: Source,
        started: float,
    ) -> None:
        self._tasks.discard(task)
        if pinned is not None:
            pin = self._pins.get(pinned)
            if pin is not None and pin[0] is ctx:
                pin[1] -= 1
                if pin[1] == 0:
                    del self._pins[pinned]
        if task.cancelled():
            sock.close()
            return
        exc = task.exception()
        if exc is None:
            transport = task.result()[0]
            sslobj = transport.get_extra_info("ssl_object")
            version = (sslobj.version() if sslobj is not None else None) or "unknown"
            self.stats.done(version, source, asyncio.get_running_loop().time() - started)
        else:
            log.debug("handshake for %s failed: %s", pinned, exc)
            self.stats.fail("handshake")
            sock.close()

    def _sni_callback(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        """Runs inside do_handshake: no I/O, one dict lookup (DESIGN.md)."""
        if server_name is None:
            return None
        pin = self._pins.get(names.normalize(server_name))  # type: ignore[arg-type]
        if pin is not None:
            sslobj.context = pin[0]
        return None
