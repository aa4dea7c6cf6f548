"""Listening sockets, bound before the event loop serves them (workers share
them with SO_REUSEPORT)."""

from __future__ import annotations

import socket

from edge.config import Address
from edge.errors import StartupError


def bind(address: Address, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        sock.close()
        hint = " (ports under 1024 need root or CAP_NET_BIND_SERVICE)" if address.port < 1024 else ""
        raise StartupError(f"cannot listen on {address}: {exc.strerror}{hint}") from None
    sock.listen(4096)
    sock.setblocking(False)
    return sock
