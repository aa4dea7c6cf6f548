"""Before the TLS stack: accepting sockets and waiting for their ClientHello.

Two things one client (or a flood) must not turn into a busy event loop:

* ``accept`` failing for lack of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM)
  leaves the pending connection in the backlog, so the listener stays
  readable and a level-triggered reader fires again at once: a spin at 100%
  CPU that starves every connection and the admin API. ``AcceptLoop`` stops
  watching the listener for a while instead (as nginx's
  ``accept_mutex_delay``/``ngx_disable_accept_events`` does) and logs once per
  period.
* A ClientHello arriving in pieces. ``HelloReader`` sets SO_RCVLOWAT
  (socket(7)) to the number of bytes the message still needs, so epoll
  wakes us only when they are there: no polling timers, and a trickling
  client costs one wake-up per record at most, within the handshake
  timeout and ``clienthello.MAX_WIRE_SIZE`` bytes.

The ClientHello is read, not peeked: the bytes go to the TLS stack with the
socket (``Accepted.received``, written into the SSL object's incoming BIO
before its first ``do_handshake``), so the handshake answers at once instead
of waiting for another wake-up and reading the same bytes again. Almost
every ClientHello is whole at accept (``TCP_DEFER_ACCEPT``): one read, and
no timer or waiting state is made for it.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from edge.limits import ConnectionLimits
from edge.tls import clienthello
from edge.tls.gate import Gate, Peer

log = logging.getLogger(__name__)

# accept(2) errors that mean "no resource now", not "this connection is bad".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2) "Error handling": Linux passes a pending network error of the new
# connection to accept(); that connection is gone, the next one may be fine.
CONNECTION_ERRNOS = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
    errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
})
PAUSE_FIRST = 0.1  # seconds without accepting after a resource error...
PAUSE_MAX = 1.0  # ...doubling while it lasts, up to this
LOG_EVERY = 10.0  # at most one warning per this many seconds while it lasts
_BATCH = 64  # accepts per wake-up, so one busy listener cannot starve the loop


class Accepted(socket.socket):
    """An accepted connection, and the bytes read from it before the TLS stack
    takes it over (its ClientHello, and anything sent right after it).

    Blocking as accept(2) leaves it: edge's own reads pass MSG_DONTWAIT, and
    uvloop makes the descriptor non-blocking when it takes it (libuv's
    ``uv_tcp_open``), as it sets TCP_NODELAY: no system call of ours for either.

    ``family`` and ``type`` are the plain numbers (``_socket.socket``'s own):
    uvloop reads them three times per connection, and ``socket.socket``'s
    properties turn each into an enum member on every read."""

    __slots__ = ("received",)

    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]

    def __init__(self, family: int, type: int, proto: int, fileno: int) -> None:
        # socket.socket.__init__ without its Python frame: it only sets these two.
        _socket.socket.__init__(self, family, type, proto, fileno)
        self._io_refs = 0
        self._closed = False
        self.received = b""


class AcceptLoop:
    """Accept connections on one listening socket and pass each on, with its peer address.

    At ``[limits] max_connections`` open connections it stops accepting until
    one closes: new clients wait in the listen backlog (as nginx's
    ``worker_connections`` and HAProxy's ``maxconn`` make them), rather than
    being accepted and dropped."""

    def __init__(self, sock: socket.socket, on_socket: Callable[[Accepted, tuple], None],
                 limits: ConnectionLimits | None = None) -> None:
        self.sock = sock
        self.on_socket = on_socket
        self.limits = limits if limits is not None and limits.max else None
        self._loop = asyncio.get_running_loop()
        self._pause = PAUSE_FIRST
        self._resume: asyncio.TimerHandle | None = None
        self._held = False  # not accepting until a connection closes (max_connections)
        self._closed = False
        self._unlogged = 0
        self._logged_at = -LOG_EVERY
        self._family = int(sock.family)
        self._loop.add_reader(sock.fileno(), self._ready)

    def close(self) -> None:
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        elif not self._held:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _ready(self) -> None:
        # Accept until EAGAIN (at most _BATCH): under load several connections
        # wait per wake-up, and libuv then registers them with one io_uring
        # submission. One accept per wake-up, as uvloop's own servers do,
        # measured ~1 system call more per connection with 8 concurrent
        # clients (an epoll_pwait and an io_uring_enter each) against the
        # EAGAIN it saves, ~0.25 per connection there.
        limits = self.limits
        for _ in range(_BATCH):
            if limits is not None and limits.full():
                self._loop.remove_reader(self.sock.fileno())
                self._held = True
                limits.when_room(self._room)
                return
            try:
                fd, addr = self.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                self._pause = PAUSE_FIRST
                return
            except OSError as exc:
                if exc.errno in CONNECTION_ERRNOS:
                    log.debug("accept: %s", exc)
                    continue
                # Out of descriptors or memory, or anything unforeseen: a
                # readable listener we cannot accept from must not be retried
                # at once, or the loop spins.
                self._stop_for_a_while(exc)
                return
            self.on_socket(Accepted(self._family, socket.SOCK_STREAM, 0, fd), addr)

    def _room(self) -> None:
        if self._held and not self._closed:
            self._held = False
            self._loop.add_reader(self.sock.fileno(), self._ready)

    def _stop_for_a_while(self, exc: OSError) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self._unlogged += 1
        now = self._loop.time()
        if now - self._logged_at >= LOG_EVERY:
            log.warning("accept on %s failed %d time(s) (%s): not accepting for %.1f s at a time until it passes",
                        _name(self.sock), self._unlogged, errno.errorcode.get(exc.errno or 0, exc), self._pause)
            self._logged_at = now
            self._unlogged = 0
        self._resume = self._loop.call_later(self._pause, self._start_again)
        self._pause = min(self._pause * 2, PAUSE_MAX)

    def _start_again(self) -> None:
        self._resume = None
        self._loop.add_reader(self.sock.fileno(), self._ready)


class PlainListener:
    """A listener whose connections go to ``protocol_factory`` without TLS.

    What ``loop.create_server(sock=...)`` does, with ``AcceptLoop``'s
    behaviour at the descriptor limit: under uvloop, libuv answers EMFILE by
    accepting and closing the waiting connections with a spare descriptor
    (their clients see a reset), and when that fails, or on ENOBUFS/ENOMEM,
    uvloop closes the listening server for good. Here they wait in the
    backlog until descriptors free up. Knows nothing of HTTP."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[Peer | None], asyncio.BaseProtocol],
                 gate: Gate | None = None) -> None:
        self.sockets = [sock]
        self._factory = protocol_factory
        self._gate = gate if gate is not None and gate.active else None
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        sock.setblocking(False)
        self._accept = AcceptLoop(sock, self._accepted, gate.limits if gate is not None else None)

    def _accepted(self, conn: socket.socket, address: tuple) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._gate is None:
            self._connect(conn, None, None)
        else:
            self._gate.admit(conn, address, self._connect)

    def _connect(self, conn: socket.socket, peer: Peer | None, _deadline: float | None) -> None:
        factory = self._factory
        task = self._loop.create_task(self._loop.connect_accepted_socket(lambda: factory(peer), conn))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("plain connection failed at once: %s", task.exception())

    def close(self) -> None:
        self._accept.close()


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def close_gently(sock: socket.socket, last_words: bytes = b"") -> None:
    """Send ``last_words`` (a TLS alert, an HTTP answer) and close without a reset.

    Closing a socket with unread bytes in its receive queue sends a TCP RST
    (RFC 2525 §2.17), and a client that receives the RST first discards what
    we sent before it: it sees "connection reset" instead of our alert. So the
    peeked bytes are read and dropped first, and the write side shut down
    (FIN) after the message."""
    try:
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
    except OSError:
        pass  # BlockingIOError: nothing more queued
    try:
        if last_words:
            sock.send(last_words, socket.MSG_DONTWAIT)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


class _Pending:
    __slots__ = ("deadline", "lowat", "peer", "reading", "sock", "timer")

    def __init__(self, sock: Accepted, deadline: float, peer: Peer | None) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.timer: asyncio.TimerHandle | None = None
        self.lowat = 1
        self.reading = False


class HelloReader:
    """Read each socket's ClientHello, waiting without polling until it is whole."""

    def __init__(
        self,
        timeout: float,
        on_hello: Callable[[Accepted, clienthello.ClientHello, float, Peer | None], None],
        on_refused: Callable[[socket.socket, bytes, str | clienthello.NotClientHello], None],
    ) -> None:
        self.timeout = timeout
        # on_hello(sock, hello, deadline, peer), the bytes read in sock.received;
        # on_refused(sock, bytes received, why): why is "timeout", "closed" or
        # what the parser found wrong.
        self.on_hello = on_hello
        self.on_refused = on_refused
        self._pending: dict[int, _Pending] = {}
        self._loop = asyncio.get_running_loop()
        # One buffer for every read: no 64 KiB allocation (and brk) per connection.
        self._buffer = bytearray(clienthello.MAX_WIRE_SIZE)
        self._view = memoryview(self._buffer)

    def __len__(self) -> int:  # connections still waiting (a shutdown lets them finish)
        return len(self._pending)

    def take(self, sock: Accepted, _address: tuple) -> None:
        """``AcceptLoop``'s callback when nothing comes before the ClientHello (no gate)."""
        deadline = self._loop.time() + self.timeout
        # Almost always whole at once: the waiting state is made only when it is not.
        need = self._read(sock, None, deadline, None)
        if need:
            self._hold(sock, deadline, None, need)

    def add(self, sock: Accepted, peer: Peer | None = None, deadline: float | None = None) -> None:
        """Read ``sock``'s ClientHello, waiting until ``deadline`` (default: the timeout from now)."""
        if deadline is None:
            deadline = self._loop.time() + self.timeout
        need = self._read(sock, None, deadline, peer)
        if need:
            self._hold(sock, deadline, peer, need)

    def _hold(self, sock: Accepted, deadline: float, peer: Peer | None, need: int) -> None:
        fd = sock.fileno()
        pending = _Pending(sock, deadline, peer)
        pending.timer = self._loop.call_at(deadline, self._expired, fd)
        self._pending[fd] = pending
        self._wait(fd, pending, need)

    def close_all(self) -> None:
        for fd in list(self._pending):
            self._forget(fd).sock.close()

    def _forget(self, fd: int) -> _Pending:
        pending = self._pending.pop(fd)
        if pending.timer is not None:
            pending.timer.cancel()
        if pending.reading:
            self._loop.remove_reader(fd)
        return pending

    def _expired(self, fd: int) -> None:
        if fd in self._pending:
            sock = self._forget(fd).sock
            self.on_refused(sock, sock.received, "timeout")

    def _try(self, fd: int) -> None:
        pending = self._pending.get(fd)
        if pending is None:
            return
        need = self._read(pending.sock, pending, pending.deadline, pending.peer)
        if need:
            self._wait(fd, pending, need)

    def _read(self, sock: Accepted, pending: _Pending | None, deadline: float, peer: Peer | None) -> int:
        """Read what has arrived and act on it: 0 when the connection is handed
        on or refused, else how many more bytes the ClientHello needs at least.
        ``pending``: its waiting state, None on the first read (right at accept)."""
        room = clienthello.MAX_WIRE_SIZE - len(sock.received)
        if room <= 0:  # cannot happen (parse refuses first); recv_into would read 0 as "all of it"
            self._refuse(sock, pending, sock.received, clienthello.TooLarge("ClientHello past its bounds"))
            return 0
        try:
            count = sock.recv_into(self._buffer, room, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 1 if pending is None else pending.lowat
        except OSError:
            self._refuse(sock, pending, sock.received, "closed")
            return 0
        if not count:
            # End of stream before the ClientHello was whole.
            self._refuse(sock, pending, sock.received, "closed")
            return 0
        data = sock.received = sock.received + self._view[:count] if sock.received else bytes(self._view[:count])
        try:
            hello = clienthello.parse(data)
        except clienthello.NeedMore as more:
            return more.need - len(data)
        except clienthello.NotClientHello as exc:
            self._refuse(sock, pending, data, exc)
            return 0
        if pending is not None:
            # Stop watching it before handing it on: the TLS transport takes the
            # descriptor (and its reader) at once.
            self._forget(sock.fileno())
            if pending.lowat != 1:
                # Back to the default before the TLS stack reads: a low-water mark
                # would delay its wake-ups too.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self.on_hello(sock, hello, deadline, peer)
        return 0

    def _refuse(self, sock: Accepted, pending: _Pending | None, data: bytes,
                why: str | clienthello.NotClientHello) -> None:
        if pending is not None:  # waited: watched no more
            self._forget(sock.fileno())
        self.on_refused(sock, data, why)

    def _wait(self, fd: int, pending: _Pending, need: int) -> None:
        if need != pending.lowat:
            pending.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            pending.lowat = need
        if not pending.reading:
            self._loop.add_reader(fd, self._try, fd)
            pending.reading = True
