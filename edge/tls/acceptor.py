"""The TLS listener: accept, read the ClientHello, get the context, hand over.

Why not a plain ``create_server(ssl=...)`` with an ``sni_callback``: the
callback runs inside ``do_handshake`` on the event-loop thread and cannot
await, so a cold name would build its context (~1 ms of OpenSSL work, plus a
store read) while every other connection waits. Instead:

1. accept the raw socket (``intake.AcceptLoop``: pauses when out of fds);
2. wait for the whole ClientHello and read it (``intake.HelloReader``), the
   bytes kept with the socket for the TLS stack, and parse SNI and ALPN
   (``clienthello.parse``);
3. select the certificate (``Selector``) and fetch its context from the
   cache, building it in a thread pool on a miss;
4. start TLS with the *listener* context, the chosen one set on the
   connection and the ClientHello given to it before the handshake
   (``handover.start_tls``).

Handshakes run with the listener context so its session-ticket keys, made
once before workers fork, are shared: resumption works across workers.
TLS versions, options and groups come from the listener; certificate and
ALPN from the chosen context. Every connection has one time budget, the
handshake timeout, from accept to the end of its handshake.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

from edge import names
from edge.store.base import StoreError
from edge.tls import clienthello, contexts, handover
from edge.tls.contexts import ContextBuildError, ContextCache
from edge.tls.gate import Gate, Peer
from edge.tls.handover import alert
from edge.tls.intake import Accepted, AcceptLoop, HelloReader, close_gently
from edge.tls.selector import Choice, Selector, Source
from edge.tls.stats import HandshakeStats, TlsInfo

__all__ = ["HandshakeStats", "ProtocolFactory", "TlsAcceptor", "TlsInfo"]

log = logging.getLogger(__name__)

_ACME_TLS = b"acme-tls/1"  # RFC 8737 §6.2: the ALPN protocol of TLS-ALPN-01 validation
_ACME_ONLY = (_ACME_TLS,)
_MAX_HOST_NAME = 255  # RFC 6066 §3 / RFC 1035 §2.3.4; OpenSSL refuses longer ones itself

ProtocolFactory = Callable[[TlsInfo], asyncio.BaseProtocol]


class _ClosingProtocol(asyncio.Protocol):
    """After a TLS-ALPN-01 handshake: close (RFC 8737 §3, no application data)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def server_name(raw: bytes | None) -> str | None:
    """The canonical SNI name, or None when absent or no valid host name (SPEC §2).

    RFC 6066 §3: HostName is ASCII (A-labels); bytes that are not (UTF-8,
    Latin-1, NUL, over 255 bytes) are no host name, whatever a client meant."""
    if raw is None:
        return None
    if len(raw) > _MAX_HOST_NAME or not raw.isascii() or b"\0" in raw:
        log.debug("SNI of %d bytes is no ASCII host name: treated as absent", len(raw))
        return None
    return names.normalize(raw)


def is_acme_validation(hello: clienthello.ClientHello) -> bool:
    """RFC 8737 §3: the validation server offers ``acme-tls/1`` and nothing
    else. A browser listing it among others gets a normal handshake."""
    return hello.alpn == _ACME_ONLY


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
        ensure: Callable[[str], Awaitable[None]] | None = None,
        loaded: asyncio.Event | None = None,
        not_tls: Callable[[bytes], bytes] | None = None,
        gate: Gate | None = None,
    ) -> None:
        # The listener context holds the default certificate (no SNI, unknown names).
        self.listener_context = listener_context
        self.platform_context = platform_context
        self.selector = selector
        self.cache = cache
        self.handshake_timeout = handshake_timeout
        # TLS-ALPN-01: the validation certificate of a name, from the store.
        self.challenge_certificate = challenge_certificate
        # The store follower's: until ``loaded`` is set, ``ensure(name)`` before selecting.
        self.ensure = ensure
        self.loaded = loaded
        # Bytes that are no ClientHello: what to send back before closing (given
        # the bytes received). The HTTP layer decides; this one knows no HTTP.
        self.not_tls = not_tls
        # PROXY headers and connection limits, before the ClientHello (edge.tls.gate).
        self.gate = gate if gate is not None and gate.active else None
        self.stats = HandshakeStats()
        self._listeners: list[AcceptLoop] = []
        self._readers: list[HelloReader] = []
        self._tasks: set[asyncio.Task | handover.Handshake] = set()  # before or in their handshake
        self._loop: asyncio.AbstractEventLoop | None = None  # the running one, from listen()
        handover.install(listener_context)
        handover.quiet_writes_after_close()

    # --- listening -----------------------------------------------------------
    def listen(self, sock: socket.socket, protocol_factory: ProtocolFactory) -> None:
        """Accept TLS connections on ``sock``; ``protocol_factory`` makes their protocol."""
        sock.setblocking(False)
        # Wake accept() only once the client has sent data (its ClientHello), as
        # nginx's "deferred" does: the first read then succeeds at once, without an
        # extra epoll registration and wake-up per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, int(self.handshake_timeout)))
        self._loop = asyncio.get_running_loop()
        # Callbacks are bound methods and partials, called from C: no frame of
        # a lambda per connection on the way.
        reader = HelloReader(self.handshake_timeout, partial(self._start, protocol_factory), self._refused)
        self._readers.append(reader)
        if self.gate is None:
            self._listeners.append(AcceptLoop(sock, reader.take))
        else:
            self._listeners.append(AcceptLoop(sock, partial(self._gated, reader), self.gate.limits))

    def stop_listening(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    async def finish_pending(self, timeout: float) -> None:
        """Let connections accepted and not handed to their protocol yet (ClientHello,
        handshake) finish, for up to ``timeout`` s: an upgrade fails no connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (sum(len(r) for r in self._readers) + len(self._tasks)) and loop.time() < deadline:
            await asyncio.sleep(0.02)

    def close_pending(self) -> None:
        """Drop connections still before or inside their handshake (shutdown)."""
        if self.gate is not None:
            self.gate.close_all()
        for reader in self._readers:
            reader.close_all()
        for task in list(self._tasks):
            task.cancel()

    def _gated(self, reader: HelloReader, sock: Accepted, address: tuple) -> None:
        """With a gate (PROXY protocol, limits), which reads before the ClientHello.
        Without one the reader takes each socket as accepted (``HelloReader.take``):
        no setblocking/TCP_NODELAY, it passes MSG_DONTWAIT, and uvloop sets
        both when it takes the socket (``intake.Accepted``)."""
        assert self.gate is not None
        sock.setblocking(False)  # the gate's reads wait for readiness
        self.gate.admit(sock, address, reader.add)  # type: ignore[arg-type]

    def _refused(self, sock: socket.socket, data: bytes, why: str | clienthello.NotClientHello) -> None:
        if why == "timeout":
            self.stats.fail("timeout")
            close_gently(sock)
        elif isinstance(why, clienthello.TooLarge):
            log.debug("ClientHello refused: %s", why)
            self.stats.fail("too_large")
            close_gently(sock, alert(handover.ILLEGAL_PARAMETER))  # as OpenSSL does for an oversized message
        elif isinstance(why, clienthello.NotClientHello):
            self.stats.not_tls += 1
            close_gently(sock, self.not_tls(data) if self.not_tls is not None else b"")
        else:
            close_gently(sock)  # closed before its ClientHello was whole: FIN back, not a reset

    # --- selection -----------------------------------------------------------------
    def _start(self, factory: ProtocolFactory, sock: socket.socket, hello: clienthello.ClientHello,
               deadline: float, peer: Peer | None, fetched: bool = False) -> None:
        name = server_name(hello.server_name)
        if hello.alpn == _ACME_ONLY:  # is_acme_validation, inlined: it runs per connection
            self._spawn(self._acme_tls(sock, name, deadline))
            return
        if self.loaded is not None and not fetched and name is not None and self.ensure is not None:
            if self.loaded.is_set():
                self.loaded = None  # for good: the copy never becomes incomplete again
            else:
                self._spawn(self._fetch_then_start(sock, factory, hello, name, deadline, peer))
                return
        choice = self.selector.select(name)
        if choice is not None and name is not None and choice.source is Source.DEFAULT:
            self.stats.unknown_sni += 1
        if choice is None:
            self.stats.refused_sni += 1
            close_gently(sock, alert(handover.UNRECOGNIZED_NAME))  # RFC 6066 §3: strict SNI
            return
        if choice.source is Source.DEFAULT:
            ctx: ssl.SSLContext | None = self.listener_context
        elif choice.source is Source.PLATFORM:
            ctx = self.platform_context
        else:
            ctx = self.cache.get_nowait(choice.cache_key)
        if ctx is None:
            # A cold name: build its context off the loop, then hand over.
            self._spawn(self._cold(sock, factory, name, hello, choice, deadline, peer))
            return
        self._handover(sock, factory, name, hello, choice, ctx, deadline, peer)

    def _left(self, deadline: float) -> float:
        return deadline - asyncio.get_running_loop().time()

    async def _fetch_then_start(self, sock: socket.socket, factory: ProtocolFactory,
                                hello: clienthello.ClientHello, name: str, deadline: float,
                                peer: Peer | None) -> None:
        assert self.ensure is not None
        try:
            await asyncio.wait_for(self.ensure(name), max(0.0, self._left(deadline)))
        except (StoreError, OSError, TimeoutError) as exc:
            log.error("reading %s from the store failed: %s; selecting from what is loaded", name, exc)
        self._start(factory, sock, hello, deadline, peer, fetched=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _acme_tls(self, sock: socket.socket, name: str | None, deadline: float) -> None:
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
            # No challenge of ours: the only protocol offered is not one we serve (RFC 7301 §3.2).
            # Any client can ask this: debug, so it cannot flood the log.
            log.debug("TLS-ALPN-01 validation for %s, but no challenge is pending", name)
            self.stats.fail("acme_tls")
            close_gently(sock, alert(handover.NO_APPLICATION_PROTOCOL))
            return
        try:
            ctx = await asyncio.get_running_loop().run_in_executor(None, contexts.build_context, [pem])
        except (ContextBuildError, OSError) as exc:  # OSError: no descriptor left for the memfd
            log.error("TLS-ALPN-01 answer for %s is unusable: %s", name, exc)
            close_gently(sock, alert(handover.INTERNAL_ERROR))
            return
        ctx.set_alpn_protocols([_ACME_TLS.decode()])
        handover.install(ctx)
        try:
            await handover.handshake(sock, _ClosingProtocol, ctx, None, max(0.001, self._left(deadline)))
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.debug("TLS-ALPN-01 handshake for %s failed: %s", name, exc)
            sock.close()
            return
        log.info("TLS-ALPN-01 validation certificate served for %s", name)

    async def _cold(self, sock: socket.socket, factory: ProtocolFactory, name: str | None,
                    hello: clienthello.ClientHello, choice: Choice, deadline: float, peer: Peer | None) -> None:
        try:
            ctx = await asyncio.wait_for(self.cache.get(choice.cache_key), max(0.0, self._left(deadline)))
        except (ContextBuildError, StoreError, OSError, TimeoutError, ValueError) as exc:
            # A stored bundle OpenSSL refuses (edited by hand) or a store that
            # went away: fall through to the default certificate, as for an
            # unknown name, rather than failing the handshake.
            log.error("no TLS context for %s (%s): %s; serving the default certificate",
                      name, choice.source.value, exc)
            self.stats.fail("context")
            if self.selector.strict_sni:
                close_gently(sock, alert(handover.INTERNAL_ERROR))
                return
            ctx = self.listener_context
        self._handover(sock, factory, name, hello, choice, ctx, deadline, peer)

    # --- handshake -----------------------------------------------------------------
    def _handover(self, sock: socket.socket, factory: ProtocolFactory, name: str | None,
                  hello: clienthello.ClientHello, choice: Choice, ctx: ssl.SSLContext, deadline: float,
                  peer: Peer | None = None) -> None:
        """Start the TLS handshake with ``ctx``'s certificate, in what is left of the budget.

        No coroutine or task of ours wraps it: the hot path is uvloop's
        ``connect_accepted_socket`` stepped by ``handover.Handshake``, and a
        done callback.
        """
        loop = self._loop or asyncio.get_running_loop()
        started = loop.time()
        left = deadline - started
        if left <= 0:
            self.stats.fail("timeout")
            close_gently(sock)
            return
        source = choice.source
        handshake = handover.start_tls(
            sock, partial(factory, TlsInfo(name, source, hello.alpn, peer)), self.listener_context, ctx, left,
            partial(self._handshake_done, sock, name, source, started), loop)
        if not handshake.ended:
            self._tasks.add(handshake)

    def _handshake_done(self, sock: socket.socket, name: str | None, source: Source, started: float,
                        handshake: handover.Handshake,
                        result: tuple[asyncio.BaseTransport, asyncio.BaseProtocol] | None,
                        exc: BaseException | None) -> None:
        self._tasks.discard(handshake)
        if result is not None:
            sslobj = result[0].get_extra_info("ssl_object")
            version = (sslobj.version() if sslobj is not None else None) or "unknown"
            self.stats.done(version, source, (self._loop or asyncio.get_running_loop()).time() - started)
        elif isinstance(exc, asyncio.CancelledError):
            sock.close()
        else:
            log.debug("handshake for %s failed: %s", name, exc)
            self.stats.fail("handshake")
            sock.close()
