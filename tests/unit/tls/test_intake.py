"""HelloReader on real TCP sockets: the ClientHello is read (not peeked) and
travels with the socket to the TLS stack; waiting happens only when it is not
whole yet."""

from __future__ import annotations

import asyncio
import socket

import pytest

from edge.tls import clienthello
from edge.tls.intake import Accepted, AcceptLoop, HelloReader

from .test_clienthello import python_hello


def _connected() -> tuple[socket.socket, Accepted]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        fd, _ = listener._accept()  # type: ignore[attr-defined]
    return client, Accepted(socket.AF_INET, socket.SOCK_STREAM, 0, fd)


class _Outcome:
    def __init__(self) -> None:
        self.hellos: list[tuple[Accepted, clienthello.ClientHello]] = []
        self.refused: list[tuple[bytes, object]] = []
        self.event = asyncio.Event()

    def on_hello(self, sock: Accepted, hello: clienthello.ClientHello, _deadline: float, _peer: object) -> None:
        self.hellos.append((sock, hello))
        self.event.set()

    def on_refused(self, _sock: socket.socket, data: bytes, why: object) -> None:
        self.refused.append((data, why))
        self.event.set()


def _queued(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return b""


async def _arrived(sock: socket.socket, count: int) -> None:
    """Poll (deadline 5 s) until ``count`` bytes are queued on ``sock``."""
    deadline = asyncio.get_running_loop().time() + 5
    while len(_queued(sock)) < count:
        assert asyncio.get_running_loop().time() < deadline, "the bytes sent never arrived"
        await asyncio.sleep(0.001)


def test_whole_hello_is_read_at_once_and_kept_with_the_socket() -> None:
    hello = python_hello("www.example.com", ["h2"])

    async def run() -> None:
        outcome = _Outcome()
        reader = HelloReader(5.0, outcome.on_hello, outcome.on_refused)
        client, sock = _connected()
        with client, sock:
            client.sendall(hello)
            await _arrived(sock, len(hello))  # as TCP_DEFER_ACCEPT has it for a listener
            reader.add(sock)
            # Handed on within add(): no waiting state, no timer.
            assert len(reader) == 0
            ((got, parsed),) = outcome.hellos
            assert got is sock and parsed.server_name == b"www.example.com" and parsed.alpn == (b"h2",)
            assert sock.received == hello  # for the SSL object's incoming BIO...
            assert _queued(sock) == b""  # ...since the kernel no longer holds it

    asyncio.run(run())


def test_hello_in_pieces_waits_then_arrives_whole() -> None:
    hello = python_hello("www.example.com")

    async def run() -> None:
        outcome = _Outcome()
        reader = HelloReader(5.0, outcome.on_hello, outcome.on_refused)
        client, sock = _connected()
        with client, sock:
            client.sendall(hello[:100])
            await _arrived(sock, 100)
            reader.add(sock)
            assert len(reader) == 1 and outcome.hellos == []
            # Woken only once the rest can be there (socket(7) SO_RCVLOWAT).
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == len(hello) - 100
            client.sendall(hello[100:])
            await asyncio.wait_for(outcome.event.wait(), 5)
            assert len(reader) == 0 and sock.received == hello
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1  # the TLS stack's default back

    asyncio.run(run())


@pytest.mark.parametrize("sent", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"])
def test_bytes_that_are_no_client_hello_are_refused_with_what_was_read(sent: bytes) -> None:
    async def run() -> None:
        outcome = _Outcome()
        reader = HelloReader(5.0, outcome.on_hello, outcome.on_refused)
        client, sock = _connected()
        with client, sock:
            client.sendall(sent)
            await _arrived(sock, len(sent))
            reader.add(sock)
            ((data, why),) = outcome.refused
            assert data == sent and isinstance(why, clienthello.NotClientHello)

    asyncio.run(run())


def test_end_of_stream_before_the_hello_is_whole_is_refused() -> None:
    hello = python_hello("www.example.com")

    async def run() -> None:
        outcome = _Outcome()
        reader = HelloReader(5.0, outcome.on_hello, outcome.on_refused)
        client, sock = _connected()
        with sock:
            client.sendall(hello[:50])
            await _arrived(sock, 50)
            reader.add(sock)
            client.close()
            await asyncio.wait_for(outcome.event.wait(), 5)
            assert outcome.refused == [(hello[:50], "closed")] and len(reader) == 0

    asyncio.run(run())


def test_accept_loop_takes_every_queued_connection() -> None:
    """Connections already queued when the loop first looks are all taken,
    each with its peer address and plain-number family and type for uvloop."""

    async def run() -> None:
        got: list[tuple[Accepted, tuple]] = []
        arrived = asyncio.Event()

        def on_socket(sock: Accepted, address: tuple) -> None:
            got.append((sock, address))
            if len(got) == 8:
                arrived.set()

        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            listener.setblocking(False)
            clients = [socket.create_connection(listener.getsockname()) for _ in range(8)]
            loop = AcceptLoop(listener, on_socket)
            try:
                await asyncio.wait_for(arrived.wait(), 5)
            finally:
                loop._loop.remove_reader(listener.fileno())
            assert sorted(a[1] for _, a in got) == sorted(c.getsockname()[1] for c in clients)
            for sock, _ in got:
                assert type(sock.family) is int and sock.family == socket.AF_INET
                assert type(sock.type) is int and sock.type == socket.SOCK_STREAM
                sock.close()
            for client in clients:
                client.close()

    asyncio.run(run())
