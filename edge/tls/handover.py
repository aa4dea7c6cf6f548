"""Handing an accepted socket to the TLS stack (uvloop's SSL transport).

The listener context does every handshake, so its session-ticket keys, made
once before workers fork, are shared and resumption works across workers.
Two things are added to the ``SSLObject`` that uvloop makes with
``listener.wrap_bio`` (``SSLContext.sslobject_class``), per connection,
through a context variable set on the handshake task:

* **The certificate context is set before the handshake starts**
  (``SSLObject.context``, i.e. ``SSL_set_SSL_CTX``), where an
  ``sni_callback`` used to swap it in: the acceptor already chose it from
  the ClientHello it read. With no SNI callback, CPython never decodes the
  client's SNI bytes, so a non-ASCII name can no longer fail the handshake
  with a traceback on stderr (CPython decodes it as strict ASCII and reports
  the error with ``PyErr_WriteUnraisable``). Certificate and ALPN come from
  the set context; versions, options, groups and ticket keys stay the
  listener's (OpenSSL reads them from the SSL object and its session_ctx).
* **The ClientHello edge already read is the SSL object's first input**
  (``intake.Accepted.received``, written into its incoming BIO), so the
  first ``do_handshake``, right at ``connection_made``, answers it.
* **uvloop calls the C methods themselves** for ``read``, ``write`` and
  ``pending`` (several times per request), and ``do_handshake`` below calls
  the C one: the ``ssl.SSLObject`` methods of these names are one-line
  Python wrappers, a frame per call on every connection. (``read`` then
  takes its arguments positionally only, as uvloop passes them.)
* **A fatal alert OpenSSL wrote is sent.** uvloop (like asyncio, CPython
  issue 98078) closes the transport on a handshake error without flushing
  the outgoing BIO, so clients saw "unexpected eof" instead of
  protocol_version or handshake_failure (RFC 8446 §6.2). The bytes are
  written to the socket before uvloop closes it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import ssl
from collections.abc import Callable, Coroutine
from socket import socket
from typing import Any

from edge.tls.intake import Accepted

# RFC 8446 §6: AlertDescription values edge sends itself.
HANDSHAKE_FAILURE = 40
ILLEGAL_PARAMETER = 47
INTERNAL_ERROR = 80
UNRECOGNIZED_NAME = 112
NO_APPLICATION_PROTOCOL = 120


def alert(description: int) -> bytes:
    """A fatal alert record (RFC 8446 §5.1, §6): plaintext, as before any key
    exchange; legacy_record_version 0x0303, level fatal(2)."""
    return bytes((0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description))


# (socket, certificate context or None for the listener's own), for EdgeSSLObject._create.
_handover: contextvars.ContextVar[tuple[socket, ssl.SSLContext | None] | None] = contextvars.ContextVar(
    "edge_tls_handover", default=None)


class EdgeSSLObject(ssl.SSLObject):
    """See the module docstring. Installed on the contexts edge hands sockets over with."""

    _edge_sock: socket | None
    _edge_outgoing: ssl.MemoryBIO

    @classmethod
    def _create(cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                server_hostname: Any = None, session: Any = None, context: Any = None) -> EdgeSSLObject:
        obj: EdgeSSLObject = super()._create(  # type: ignore[misc]
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname,
            session=session, context=context,
        )
        handover = _handover.get()
        obj._edge_outgoing = outgoing
        sslobj = obj._sslobj  # type: ignore[attr-defined]
        obj.read = sslobj.read  # type: ignore[method-assign]
        obj.write = sslobj.write  # type: ignore[method-assign]
        obj.pending = sslobj.pending  # type: ignore[method-assign]
        if handover is None:
            obj._edge_sock = None
            return obj
        sock, chosen = handover
        obj._edge_sock = sock
        if chosen is not None and chosen is not context:
            sslobj.context = chosen  # what the ``context`` property's setter does
        if isinstance(sock, Accepted) and sock.received:
            incoming.write(sock.received)
            sock.received = b""  # the socket lives as long as the connection: not these bytes
        return obj

    def do_handshake(self) -> None:
        try:
            self._sslobj.do_handshake()  # type: ignore[attr-defined]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError:
            self._send_alert()
            raise

    def _send_alert(self) -> None:
        data = self._edge_outgoing.read()
        if data and self._edge_sock is not None:
            try:
                # A few bytes into an idle socket's send buffer: never blocks.
                self._edge_sock.send(data)
            except OSError:
                pass


def install(ctx: ssl.SSLContext) -> None:
    """Make ``ctx`` (a context sockets are handed over with) use EdgeSSLObject."""
    ctx.sslobject_class = EdgeSSLObject  # type: ignore[assignment]


Done = Callable[["Handshake", "tuple[asyncio.BaseTransport, asyncio.BaseProtocol] | None", "BaseException | None"],
               None]


class Handshake:
    """One socket's handover to uvloop's TLS transport, until its handshake ends.

    uvloop's ``connect_accepted_socket`` coroutine, stepped here rather than by
    a Task: its first step (the protocol, the transport, ``connection_made``
    scheduled) runs at once instead of on the next loop iteration, and the
    end of the handshake calls ``done`` straight from the waiter's callback
    (a Task would add its own object, a scheduled step, and a scheduled done
    callback per connection). ``done(handshake, (transport, protocol), None)``
    on success, ``done(handshake, None, exc)`` on failure or cancellation.
    """

    __slots__ = ("_coro", "_done", "_waiting", "ended")

    def __init__(self, coro: Coroutine[Any, Any, tuple[asyncio.BaseTransport, asyncio.BaseProtocol]],
                 done: Done) -> None:
        self._coro = coro
        self._done = done
        self._waiting: asyncio.Future[Any] | None = None
        self.ended = False  # done was called (it may be, within start_tls already)

    def cancel(self) -> None:
        """Abandon the handshake (shutdown): the transport is closed, ``done`` gets CancelledError."""
        if self._waiting is not None:
            self._waiting.cancel()

    def _step(self, _resolved: asyncio.Future[Any] | None = None) -> None:
        self._waiting = None
        try:
            waiting = self._coro.send(None)
        except StopIteration as stop:
            self.ended = True
            self._done(self, stop.value, None)
            return
        except BaseException as exc:  # CancelledError included: the coroutine closed its transport
            self.ended = True
            self._done(self, None, exc)
            return
        if waiting is None:  # a bare yield (none in uvloop today): step again on the next iteration
            asyncio.get_running_loop().call_soon(self._step)
            return
        # An asyncio future (uvloop's waiter): Future.__await__ yielded itself;
        # sending None once it is resolved returns its result or raises.
        self._waiting = waiting
        waiting.add_done_callback(self._step)


def start_tls(
    sock: socket,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    listener: ssl.SSLContext,
    context: ssl.SSLContext | None,
    timeout: float,
    done: Done,
    loop: asyncio.AbstractEventLoop | None = None,
) -> Handshake:
    """Start the handshake of ``sock`` with ``listener``, serving ``context``'s
    certificate (None: the listener's own); ``done`` is told how it ended.
    ``loop``: the running one, when the caller has it (Python 3.11's
    ``get_running_loop`` makes a getpid system call each time)."""
    if loop is None:
        loop = asyncio.get_running_loop()
    handshake = Handshake(
        loop.connect_accepted_socket(protocol_factory, sock, ssl=listener, ssl_handshake_timeout=timeout),
        done,
    )
    # Set for the first step only: uvloop copies the current context there
    # for the transport's callbacks, where EdgeSSLObject._create reads it.
    token = _handover.set((sock, None if context is listener else context))
    try:
        handshake._step()
    finally:
        _handover.reset(token)
    return handshake


async def handshake(sock: socket, protocol_factory: Callable[[], asyncio.BaseProtocol], listener: ssl.SSLContext,
                    context: ssl.SSLContext | None, timeout: float) -> asyncio.BaseTransport:
    """``start_tls`` awaited: the transport once the handshake is done (raises if it failed)."""
    ended: asyncio.Future[asyncio.BaseTransport] = asyncio.get_running_loop().create_future()

    def done(_: Handshake, result: tuple[asyncio.BaseTransport, asyncio.BaseProtocol] | None,
             exc: BaseException | None) -> None:
        if not ended.done():
            if result is not None:
                ended.set_result(result[0])
            else:
                ended.set_exception(exc or ConnectionError("handshake abandoned"))

    started = start_tls(sock, protocol_factory, listener, context, timeout, done)
    try:
        return await ended
    except asyncio.CancelledError:
        started.cancel()
        raise


# What uvloop (like asyncio) logs at WARNING, without saying which connection,
# when a protocol writes to a transport whose client has gone (from the 5th
# such write on): a client closing mid-response is normal traffic, and a line
# naming no client or host helps nobody, at any level. Dropped.
_AFTER_CLOSE = frozenset({"SSL connection is closed", "socket.send() raised exception."})


class _WritesAfterClose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in _AFTER_CLOSE


def quiet_writes_after_close() -> None:
    """Drop uvloop's writes-after-close warnings (idempotent)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _WritesAfterClose) for f in logger.filters):
        logger.addFilter(_WritesAfterClose())
