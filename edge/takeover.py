"""Listening sockets handed from a running edge to its successor (an upgrade).

Two processes that bind one port with SO_REUSEPORT each get their own accept
queue, and when the old one closes its sockets Linux resets the connections
still queued on them (unless net.ipv4.tcp_migrate_req = 1, off by default).
So a running edge offers the listening sockets themselves on a Unix socket in
the local copy's directory, and ``edge serve --takeover`` receives them
(SCM_RIGHTS, unix(7)), as HAProxy's ``expose-fd listeners`` and ``-x`` and
systemd's socket activation do: both processes then accept from the same
queues, and the old one closing its descriptors drops nothing.

The offer is a SOCK_SEQPACKET socket (one message per send, with its
descriptors), mode 0600 in a directory that holds private keys, and answers
only a peer running as the same user or root (SO_PEERCRED): a listening
socket on port 443 is not something to give away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import NamedTuple

from edge.config import Address, Config

log = logging.getLogger(__name__)

OFFER_NAME = "listeners.sock"
# Linux passes at most SCM_MAX_FD (253) descriptors in one message.
FDS_PER_MESSAGE = 200
RECEIVE_TIMEOUT = 5.0


class Listener(NamedTuple):
    """One listening socket: ``kind`` is "https" or "http"; ``address`` as
    configured, with the port it really has (port 0 resolved)."""

    kind: str
    address: Address
    sock: socket.socket


def offer_path(config: Config) -> Path:
    """Where the running edge offers its sockets: its configured local copy's directory."""
    return config.store.index_dir / OFFER_NAME


class Offer:
    """This process's listening sockets, offered to a successor at ``path``."""

    def __init__(self, path: Path, listeners: list[Listener]) -> None:
        self.path = path
        self.listeners = listeners
        self._loop: asyncio.AbstractEventLoop | None = None
        # Bound under a temporary name, then renamed over the path: a successor
        # replaces its predecessor's offer atomically, and the predecessor,
        # stopping later, removes the path only while it is still its own.
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.bind(str(staging))
            os.chmod(staging, 0o600)
            self._sock.listen(8)
            self._sock.setblocking(False)
            os.replace(staging, path)
            self._inode = os.stat(path).st_ino
        except OSError:
            self._sock.close()
            staging.unlink(missing_ok=True)
            raise

    @classmethod
    def open(cls, path: Path, listeners: list[Listener], loop: asyncio.AbstractEventLoop | None = None) -> Offer | None:
        """The offer, answered on ``loop`` when given (else call ``answer``);
        None, and said why, when it cannot be made."""
        try:
            offer = cls(path, listeners)
        except OSError as exc:
            log.warning("cannot offer the listening sockets to a successor at %s (%s): an upgrade "
                        "(serve --takeover) will bind the ports beside this process instead", path, exc)
            return None
        if loop is not None:
            loop.add_reader(offer.fileno(), offer.answer)
            offer._loop = loop
        return offer

    def fileno(self) -> int:
        return self._sock.fileno()

    def answer(self) -> None:
        """Hand the listeners to every successor waiting (non-blocking)."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # BlockingIOError: nobody else waiting
                return
            with conn:
                try:
                    self._hand_over(conn)
                except OSError as exc:
                    log.warning("handing the listening sockets to a successor failed: %s", exc)

    def _hand_over(self, conn: socket.socket) -> None:
        conn.settimeout(RECEIVE_TIMEOUT)
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                             struct.calcsize("3i")))
        if uid not in (0, os.geteuid()):
            log.warning("refused the listening sockets to pid %d: it runs as uid %d, not as this edge", pid, uid)
            return
        items = self.listeners
        for start in range(0, max(len(items), 1), FDS_PER_MESSAGE):
            part = items[start:start + FDS_PER_MESSAGE]
            head = {
                "listeners": [{"kind": item.kind, "host": item.address.host, "port": item.address.port}
                              for item in part],
                "more": start + FDS_PER_MESSAGE < len(items),
            }
            socket.send_fds(conn, [json.dumps(head).encode()], [item.sock.fileno() for item in part])
        log.info("handed %d listening sockets to a successor (pid %d)", len(items), pid)

    def close(self) -> None:
        """Stop offering; the path is removed only if no successor's offer replaced it."""
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
        self._sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except OSError:
            pass

    def forget(self) -> None:
        """In a forked child: close the inherited descriptor, leave the path alone."""
        self._sock.close()


def receive(path: Path) -> list[Listener]:
    """The listening sockets the edge running at ``path`` offers; empty (and
    said why) when none does, so that the caller binds the ports itself."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(RECEIVE_TIMEOUT)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        log.info("no running edge offers its listening sockets at %s: binding the ports", path)
        return []
    except OSError as exc:
        conn.close()
        log.warning("cannot reach the running edge's listening sockets at %s (%s): binding the ports", path, exc)
        return []
    received: list[Listener] = []
    try:
        with conn:
            more = True
            while more:
                data, fds, flags, _ = socket.recv_fds(conn, 1 << 20, FDS_PER_MESSAGE)
                more = _unpack(data, fds, flags, received)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        for item in received:
            item.sock.close()
        log.warning("taking over the running edge's listening sockets failed (%s): binding the ports", exc)
        return []
    log.info("took over %d listening sockets from the running edge", len(received))
    return received


def _unpack(data: bytes, fds: list[int], flags: int, into: list[Listener]) -> bool:
    """Add one message's listeners to ``into``; whether more messages follow."""
    socks = [socket.socket(fileno=fd) for fd in fds]  # ours from here on: closed on any error
    try:
        if not data:
            raise ValueError("the running edge closed the connection before sending its listeners")
        if flags & socket.MSG_CTRUNC:
            raise ValueError("descriptors were lost in transit (MSG_CTRUNC)")
        head = json.loads(data)
        entries = head["listeners"]
        if len(entries) != len(socks):
            raise ValueError(f"{len(entries)} listeners described, {len(socks)} descriptors received")
        got = []
        for entry, sock in zip(entries, socks, strict=True):
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ValueError(f"the descriptor for {entry['host']}:{entry['port']} is not a listening TCP socket")
            got.append(Listener(str(entry["kind"]), Address(str(entry["host"]), int(entry["port"])), sock))
    except (ValueError, KeyError, TypeError, OSError):
        for sock in socks:
            sock.close()
        raise
    into.extend(got)
    return bool(head.get("more"))
