"""Property tests of the request-head path: no input crashes the protocol,
and every connection ends answered, closed, or waiting for more bytes."""

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.proxy.test_protocol import make_protocol

VALID = b"GET /a HTTP/1.1\r\nHost: nope.test\r\nX-A: b\r\n\r\n"


def feed(pieces: list[bytes]):
    async def scenario():
        protocol, transport = make_protocol(tls_name=None)
        for piece in pieces:
            if transport.closed:
                break
            protocol.data_received(piece)  # must never raise
        # Let any task spawned by a request run (none reach a backend here).
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        return protocol, transport

    return asyncio.run(scenario())


def check(protocol, transport) -> None:
    written = bytes(transport.written)
    # Whatever was written is a sequence of complete HTTP/1.1 responses.
    for response in filter(None, written.split(b"HTTP/1.1 ")):
        status = response[:3]
        assert status.isdigit() and 400 <= int(status) < 600, written[:200]
    assert not protocol.queue  # connection_lost released every exchange
    assert not protocol.shared.connections


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes(data):
    check(*feed([data]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(VALID) - 1), max_size=5), st.binary(min_size=1, max_size=3),
       st.integers(1, 20))
def test_mutated_valid_head(positions, replacement, split):
    data = bytearray(VALID)
    for position in positions:
        data[position : position + 1] = replacement
    pieces = [bytes(data[i : i + split]) for i in range(0, len(data), split)]
    check(*feed(pieces))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"Host: a.test\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
    b"\r\n", b"abc", b"0\r\n\r\n", b"3\r\nabc\r\n", b"Connection: close\r\n", b"Expect: 100-continue\r\n",
    b"Upgrade: websocket\r\nConnection: upgrade\r\n", b"POST /x HTTP/1.0\r\n", b" folded\r\n", b"\n",
]), max_size=12))
def test_sequences_of_header_lines(lines):
    check(*feed(lines))
