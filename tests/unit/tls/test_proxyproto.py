"""PROXY protocol v1/v2 parsing on byte fixtures (HAProxy doc/proxy-protocol.txt)."""

from __future__ import annotations

import pytest

from edge.tls import proxyproto
from edge.tls.proxyproto import Header, Invalid, NeedMore, parse

HELLO = b"\x16\x03\x01\x00\x05hello"

# §2.2 example shapes, written out byte by byte rather than with the helper.
V2_TCP4 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"  # signature
    "21"  # version 2, PROXY
    "11"  # AF_INET, STREAM
    "000c"  # 12 bytes of addresses
    "c0000201"  # 192.0.2.1
    "7f000001"  # 127.0.0.1
    "d431"  # 54321
    "01bb"  # 443
)
V2_TCP6 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a" "21" "21" "0024"
    "20010db8000000000000000000000001"
    "00000000000000000000000000000001"
    "3039" "01bb"
)
V2_LOCAL = bytes.fromhex("0d0a0d0a000d0a515549540a" "20" "00" "0000")


def test_v1_tcp4_and_what_follows_stays() -> None:
    data = b"PROXY TCP4 192.0.2.1 127.0.0.1 54321 443\r\n" + HELLO
    header = parse(data)
    assert header == Header(len(data) - len(HELLO), ("192.0.2.1", 54321), ("127.0.0.1", 443), 1)
    assert data[header.length:] == HELLO


def test_v1_tcp6() -> None:
    header = parse(b"PROXY TCP6 2001:db8::1 ::1 12345 443\r\nGET")
    assert header.source == ("2001:db8::1", 12345)


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    assert parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n") == Header(31, None)
    assert parse(b"PROXY UNKNOWN\r\n") == Header(15, None)


@pytest.mark.parametrize("prefix", [b"P", b"PROXY", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"])
def test_v1_prefix_needs_more(prefix: bytes) -> None:
    with pytest.raises(NeedMore) as more:
        parse(prefix)
    assert more.value.need == len(prefix) + 1


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 192.0.2.1 127.0.0.1 54321\r\n",  # a field missing
    b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",  # IPv6 under TCP4
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",  # IPv4 under TCP6
    b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n",  # port out of range
    b"PROXY TCP4 1.2.3.4 1.2.3.5 080 2\r\n",  # leading zero
    b"PROXY TCP4 1.2.3.4 1.2.3.5 -1 2\r\n",
    b"PROXY TCP4  1.2.3.4 1.2.3.5 1 2\r\n",  # two spaces
    b"PROXY UDP4 1.2.3.4 1.2.3.5 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\n",  # bare LF: no CRLF within 107 bytes once long enough
    b"PROXY TCP4 " + b"1" * 120 + b"\r\n",  # over 107 bytes
    b"PROXX TCP4 1.2.3.4 1.2.3.5 1 2\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    HELLO,
])
def test_v1_malformed(data: bytes) -> None:
    with pytest.raises((Invalid, NeedMore)) as caught:
        parse(data)
    if isinstance(caught.value, NeedMore):  # only a short prefix may wait: pad it past the limit
        with pytest.raises(Invalid):
            parse(data + b" " * proxyproto.V1_MAX)


def test_v2_tcp4_tcp6_local() -> None:
    assert parse(V2_TCP4 + HELLO) == Header(28, ("192.0.2.1", 54321), ("127.0.0.1", 443), 2)
    assert parse(V2_TCP6) == Header(52, ("2001:db8::1", 12345), ("::1", 443), 2)
    assert parse(V2_LOCAL + HELLO) == Header(16, None, None, 2)


def test_v2_helper_writes_the_fixtures() -> None:
    assert proxyproto.v2(("192.0.2.1", 54321), ("127.0.0.1", 443)) == V2_TCP4
    assert proxyproto.v2(None) == V2_LOCAL
    assert proxyproto.v1(("192.0.2.1", 54321), ("127.0.0.1", 443)) == b"PROXY TCP4 192.0.2.1 127.0.0.1 54321 443\r\n"


def test_v2_tlvs_are_skipped() -> None:
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP (§2.2.7 / §2.2.8)
    data = proxyproto.v2(("10.0.0.1", 1), tlvs=tlv) + HELLO
    header = parse(data)
    assert header.source == ("10.0.0.1", 1) and data[header.length:] == HELLO


def test_v2_local_with_addresses_skips_them() -> None:
    data = V2_LOCAL[:12] + b"\x20\x11\x00\x0c" + V2_TCP4[16:] + b"rest"
    assert parse(data) == Header(28, None, None, 2)


@pytest.mark.parametrize("cut", range(1, len(V2_TCP4)))
def test_v2_every_prefix_needs_more(cut: int) -> None:
    with pytest.raises(NeedMore) as more:
        parse(V2_TCP4[:cut])
    assert more.value.need == (16 if cut < 16 else 28)


def test_v2_unspec_and_unix_keep_the_peer() -> None:
    unspec = proxyproto.V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert parse(unspec) == Header(16, None, None, 2)
    unix = proxyproto.V2_SIGNATURE + b"\x21\x31" + (216).to_bytes(2) + bytes(216)
    assert parse(unix).source is None


@pytest.mark.parametrize("data", [
    proxyproto.V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
    proxyproto.V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    proxyproto.V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # address block too short
    proxyproto.V2_SIGNATURE + b"\x21\x41\x00\x00",  # family 4
    b"\r\n\r\n\x00\r\nQUIX\n" + bytes(8),  # signature wrong
])
def test_v2_malformed(data: bytes) -> None:
    with pytest.raises(Invalid):
        parse(data)


def test_empty_needs_one_byte() -> None:
    with pytest.raises(NeedMore):
        parse(b"")
