"""The PROXY protocol header, versions 1 and 2: a pure parser on bytes.

The reference is HAProxy's ``doc/proxy-protocol.txt`` ("The PROXY protocol,
Versions 1 & 2"); sections below are that document's. A load balancer in
front of edge (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB, ...) writes
one header before the client's first byte, saying whose connection it is.

``parse(data)`` reads a header from the start of ``data`` (bytes peeked from
the socket) and returns a ``Header`` with the number of bytes it takes; it
raises ``NeedMore`` with the total length needed when ``data`` is a prefix of
a header, and ``Invalid`` when it cannot become one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# §2.2: the v2 signature, chosen to be neither HTTP nor TLS nor v1 text.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # §2.1: "a receiver ... must not try to read more than 107 characters"
_V2_HEAD = 16  # §2.2: signature (12), version/command (1), family/transport (1), length (2)
# §2.2: address block lengths by family (the high nibble of byte 14).
_V2_INET, _V2_INET6, _V2_UNIX = 0x1, 0x2, 0x3
_V2_ADDRESS_LENGTH = {_V2_INET: 12, _V2_INET6: 36, _V2_UNIX: 216}
_V2_STREAM = 0x1
V2_MAX = _V2_HEAD + 0xFFFF  # the length field is 16 bits


class Invalid(ValueError):
    """Not a PROXY header, or a malformed one: the connection must be closed (§2)."""


class NeedMore(Exception):
    """``data`` is a prefix of a header; ``need`` is the total byte count to wait for."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


@dataclass(frozen=True, slots=True)
class Header:
    """What the header said. ``source`` is None for a v2 LOCAL command (a
    health check of the proxy itself, §2.2), a v1 UNKNOWN, or an address
    family edge does not route (UNIX, UNSPEC): the connection's own peer stays
    the client."""

    length: int  # bytes the header takes on the wire
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None
    version: int = 1


def parse(data: bytes) -> Header:
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        raise NeedMore(1)
    raise Invalid("no PROXY header (neither v1 text nor the v2 signature)")


def _parse_v1(data: bytes) -> Header:
    """§2.1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``."""
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise Invalid("no PROXY header (neither v1 text nor the v2 signature)")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise Invalid(f"PROXY v1 header without CRLF in its first {V1_MAX} bytes")
        raise NeedMore(len(data) + 1)
    if len(data) < len(V1_PREFIX):
        raise Invalid("truncated PROXY v1 header")
    fields = data[len(V1_PREFIX):end].split(b" ")
    if fields[0] == b"UNKNOWN":
        # §2.1: "the receiver must ignore anything presented before the CRLF".
        return Header(end + 2, None)
    if fields[0] not in (b"TCP4", b"TCP6") or len(fields) != 5:
        raise Invalid("PROXY v1 header is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    version = 4 if fields[0] == b"TCP4" else 6
    source = (_v1_address(fields[1], version), _v1_port(fields[3]))
    destination = (_v1_address(fields[2], version), _v1_port(fields[4]))
    return Header(end + 2, source, destination, 1)


def _v1_address(raw: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise Invalid(f"PROXY v1 address {raw[:46]!r} is not an IP address") from None
    if address.version != version:
        raise Invalid(f"PROXY v1 address {raw.decode()} is not IPv{version}")
    return str(address)


def _v1_port(raw: bytes) -> int:
    # §2.1: ports are decimal 0-65535 without leading zeroes ("0" itself allowed).
    if not raw.isdigit() or (len(raw) > 1 and raw[:1] == b"0") or int(raw) > 65535:
        raise Invalid(f"PROXY v1 port {raw[:8]!r} is not a number 0-65535")
    return int(raw)


def _parse_v2(data: bytes) -> Header:
    """§2.2: the binary header; TLVs after the addresses (§2.2.7) are skipped."""
    head = data[:12]
    if not V2_SIGNATURE.startswith(head):
        raise Invalid("no PROXY header (neither v1 text nor the v2 signature)")
    if len(data) < _V2_HEAD:
        raise NeedMore(_V2_HEAD)
    version_command, family_transport = data[12], data[13]
    if version_command >> 4 != 2:
        raise Invalid(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0xF
    if command > 1:
        raise Invalid(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
    length = _V2_HEAD + int.from_bytes(data[14:16])
    if len(data) < length:
        raise NeedMore(length)
    if command == 0:
        # LOCAL: the proxy speaking for itself (health checks); the address
        # block, if any, is to be skipped (§2.2, "\x0" LOCAL).
        return Header(length, None, None, 2)
    family, transport = family_transport >> 4, family_transport & 0xF
    block = _V2_ADDRESS_LENGTH.get(family)
    if block is None or family == _V2_UNIX or transport != _V2_STREAM:
        if family > _V2_UNIX or transport > 2:
            raise Invalid(f"PROXY v2 family/transport byte 0x{family_transport:02x} is undefined")
        return Header(length, None, None, 2)  # §2.2: UNSPEC (or UNIX, datagrams): keep the peer
    if length - _V2_HEAD < block:
        raise Invalid(f"PROXY v2 address block of {length - _V2_HEAD} bytes, family needs {block}")
    body = data[_V2_HEAD:_V2_HEAD + block]
    half = (block - 4) // 2
    src = ipaddress.ip_address(bytes(body[:half]))
    dst = ipaddress.ip_address(bytes(body[half:2 * half]))
    ports = body[2 * half:]
    source = (str(src), int.from_bytes(ports[0:2]))
    destination = (str(dst), int.from_bytes(ports[2:4]))
    return Header(length, source, destination, 2)


def v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and tools)."""
    kind = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {kind} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2(source: tuple[str, int] | None, destination: tuple[str, int] = ("127.0.0.1", 443),
       tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY over TCP for ``source``, or LOCAL when None (for tests and tools)."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = _V2_INET if src.version == 4 else _V2_INET6
    block = src.packed + dst.packed + source[1].to_bytes(2) + destination[1].to_bytes(2) + tlvs
    return V2_SIGNATURE + bytes([0x21, family << 4 | _V2_STREAM]) + len(block).to_bytes(2) + block
