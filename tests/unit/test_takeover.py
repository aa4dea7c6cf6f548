"""Listening sockets handed from a running edge to its successor (edge.takeover,
edge.listen.open_listeners), on real sockets in this process."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge import takeover
from edge.config import Address, Config, ServerConfig, StoreConfig
from edge.listen import bind, for_worker, open_listeners
from edge.takeover import OFFER_NAME, Listener, Offer


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    made = []
    for kind in ("https", "https", "https", "http", "http"):
        sock = bind(Address("127.0.0.1", 0))
        made.append(Listener(kind, Address("127.0.0.1", sock.getsockname()[1]), sock))
    yield made
    for item in made:
        item.sock.close()


def _receive_while_answering(path: Path, offer: Offer) -> list[Listener]:
    """``takeover.receive`` in a thread, the offer answered here meanwhile."""
    got: list[list[Listener]] = []
    thread = threading.Thread(target=lambda: got.append(takeover.receive(path)))
    thread.start()
    while thread.is_alive():
        offer.answer()
        thread.join(0.01)
    return got[0]


def _accepts(item: Listener) -> bool:
    """A connection to the listener's port is accepted through ``item.sock``."""
    with socket.create_connection(("127.0.0.1", item.address.port), timeout=2):
        item.sock.settimeout(2)
        conn, _ = item.sock.accept()
        conn.close()
        return True


def test_listeners_are_handed_over_in_several_messages(tmp_path: Path, listeners: list[Listener],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(takeover, "FDS_PER_MESSAGE", 2)  # 5 listeners: 3 messages
    path = tmp_path / OFFER_NAME
    offer = Offer(path, listeners)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        received = _receive_while_answering(path, offer)
    finally:
        offer.close()
    try:
        assert [(r.kind, r.address) for r in received] == [(item.kind, item.address) for item in listeners]
        for item in received:
            # The same listening socket, not a copy: what connects to the port
            # is accepted through the received descriptor.
            assert item.sock.fileno() not in {x.sock.fileno() for x in listeners}
            listeners_of_port = [x for x in listeners if x.address == item.address]
            for other in listeners_of_port:
                other.sock.close()
            assert _accepts(item)
    finally:
        for item in received:
            item.sock.close()
    assert not path.exists()


def test_a_predecessor_stopping_leaves_its_successors_offer(tmp_path: Path, listeners: list[Listener]) -> None:
    path = tmp_path / OFFER_NAME
    old = Offer(path, listeners)
    new = Offer(path, listeners[:1])  # the successor's replaces it (rename)
    try:
        old.close()
        assert path.exists()
        received = _receive_while_answering(path, new)
        assert [r.address for r in received] == [listeners[0].address]
        for item in received:
            item.sock.close()
    finally:
        new.close()
    assert not path.exists()


def test_no_offer_means_nothing_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert takeover.receive(tmp_path / OFFER_NAME) == []
    assert "no running edge offers its listening sockets" in caplog.text
    (tmp_path / "not-a-socket").write_text("")
    assert takeover.receive(tmp_path / "not-a-socket") == []


def test_a_descriptor_that_is_not_a_listener_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever answers at the path must hand over listening TCP sockets; anything
    else is refused, every descriptor received closed, and the ports bound instead."""
    path = tmp_path / OFFER_NAME
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(str(path))
    server.listen(1)
    a, b = socket.socketpair()

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            head = {"listeners": [{"kind": "https", "host": "127.0.0.1", "port": 443}], "more": False}
            socket.send_fds(conn, [json.dumps(head).encode()], [a.fileno()])
            conn.recv(1)  # until the receiver closes

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert takeover.receive(path) == []
    finally:
        thread.join()
        server.close()
    assert "is not a listening TCP socket" in caplog.text
    # The received duplicate was closed: once a's own descriptor is, its peer sees the end.
    a.close()
    b.settimeout(2)
    assert b.recv(1) == b""
    b.close()


def _config(tmp_path: Path, https: tuple[Address, ...], http: tuple[Address, ...], takeover: bool) -> Config:
    return dataclasses.replace(
        Config(),
        server=dataclasses.replace(ServerConfig(), https=https, http=http, admin=None, takeover=takeover),
        store=dataclasses.replace(StoreConfig(), path=tmp_path / "store"),
    )


def test_open_listeners_takes_over_what_matches_and_binds_the_rest(tmp_path: Path) -> None:
    (tmp_path / "index").mkdir()
    kept = bind(Address("127.0.0.1", 0))
    gone = bind(Address("127.0.0.1", 0))
    port, gone_port = kept.getsockname()[1], gone.getsockname()[1]
    offered = [Listener("https", Address("127.0.0.1", port), kept),
               Listener("http", Address("127.0.0.1", gone_port), gone)]  # not in the new configuration
    offer = Offer(tmp_path / "index" / OFFER_NAME, offered)
    config = _config(tmp_path, (Address("127.0.0.1", port),), (Address("127.0.0.1", 0),), takeover=True)
    got: list[list[Listener]] = []
    thread = threading.Thread(target=lambda: got.append(open_listeners(config, 2)))
    thread.start()
    while thread.is_alive():
        offer.answer()
        thread.join(0.01)
    offer.close()
    kept.close()
    gone.close()
    out = got[0]
    try:
        assert [(item.kind, item.address.port) for item in out][:2] == [("https", port)] * 2
        http = [item for item in out if item.kind == "http"]
        assert len(http) == 2 and http[0].address.port != 0 and http[0].address == http[1].address
        # The taken-over socket still listens though this test closed its own
        # descriptor (the one bound beside it closed, so that it gets the connection).
        out[1].sock.close()
        assert _accepts(out[0])
        # The port no longer configured was let go: nothing holds it now.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", gone_port))
        # Two workers: one socket of each address each.
        shares = [for_worker(out, n, 2) for n in range(2)]
        assert [[item.kind for item in share] for share in shares] == [["https", "http"]] * 2
        assert {id(item.sock) for share in shares for item in share} == {id(item.sock) for item in out}
    finally:
        for item in out:
            item.sock.close()


def test_without_takeover_a_held_port_is_refused(tmp_path: Path) -> None:
    held = bind(Address("127.0.0.1", 0))
    try:
        config = _config(tmp_path, (Address("127.0.0.1", held.getsockname()[1]),), (), takeover=False)
        with pytest.raises(Exception, match="Address already in use"):
            open_listeners(config, 1)
    finally:
        held.close()


def test_another_user_is_refused_the_sockets(listeners: list[Listener],
                                             monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Only the same user (or root) gets the listening sockets (SO_PEERCRED),
    even past the socket file's 0600 mode."""
    # pytest's own temporary directories are 0700: nobody could not even reach the socket.
    reachable = Path(tempfile.mkdtemp(prefix="edge-offer-", dir="/tmp"))
    reachable.chmod(0o755)
    path = reachable / OFFER_NAME
    offer = Offer(path, listeners)
    try:
        if os.geteuid() == 0:  # a real other user: a child as nobody, through a path it may reach
            path.chmod(0o777)
            client = os.fork()
            if client == 0:  # the child only connects and reads, then leaves at once
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    os._exit(len(takeover.receive(path)))
                finally:
                    os._exit(99)
        else:  # this user, to an offer that believes it runs as another
            monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
            client = None
            got: list[list[Listener]] = []
            thread = threading.Thread(target=lambda: got.append(takeover.receive(path)))
            thread.start()
        deadline = time.monotonic() + 10
        while "refused the listening sockets" not in caplog.text and time.monotonic() < deadline:
            offer.answer()
            time.sleep(0.01)
        if client is not None:
            _, status = os.waitpid(client, 0)
            assert os.waitstatus_to_exitcode(status) == 0  # it received no socket
        else:
            thread.join(10)
            assert got == [[]]
    finally:
        offer.close()
        reachable.rmdir()
    assert "refused the listening sockets" in caplog.text
