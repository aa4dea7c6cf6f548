"""Parse the SNI and ALPN of a TLS ClientHello from the first bytes of a connection.

The listener reads these bytes before the handshake starts, so it
can fetch or build the certificate context off the event loop and hand the
socket to the TLS stack with it ready. A pure function of bytes: no I/O.

Wire format: RFC 8446 §5.1 (record), §4.1.2 (ClientHello), §4.2 (extensions),
RFC 6066 §3 (server_name), RFC 7301 §3.1 (ALPN).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_HANDSHAKE = 22  # ContentType.handshake, RFC 8446 §5.1
_CLIENT_HELLO = 1  # HandshakeType.client_hello, RFC 8446 §4
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0  # NameType.host_name, RFC 6066 §3
# Extension: type(2), extension_data length(2) (RFC 8446 §4.2), read by one C call per extension.
_EXTENSION_HEADER = struct.Struct(">HH").unpack_from
# A record header (type, version, length) and the handshake header in it (type, 24-bit length).
_HEADERS = struct.Struct(">BHHBBH").unpack_from
_NO_HEADERS = (0, 0, 0, 0, 0, 0)  # fewer than 9 bytes: the general path says what they are
# A ClientHello is at most 2^24 bytes by the format; real ones are a few KiB,
# but post-quantum key shares (ML-KEM-768 + X25519 is ~1.2 KiB per share, and
# clients may send several) and many extensions push them past one 16 KiB
# record: RFC 8446 §5.1 lets a handshake message span records. We wait for up
# to 64 KiB (OpenSSL itself accepts 128 KiB); past it the client is refused
# with an alert (TooLarge) rather than buffered.
MAX_CLIENT_HELLO = 64 * 1024
# Records a ClientHello may be cut into. Browsers use one (or 2-4 for a large
# hello, anti-censorship tools a few more); thousands of 1-byte records would
# make each re-parse of the bytes read so far cost milliseconds.
MAX_RECORDS = 64
_MAX_RECORD = 16384  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14
# The most bytes a ClientHello within both bounds can take on the wire.
MAX_WIRE_SIZE = MAX_CLIENT_HELLO + 5 * MAX_RECORDS


class NeedMore(Exception):
    """Not enough bytes yet to hold the whole ClientHello.

    ``need`` is a lower bound of the total bytes the message takes, so the
    caller can sleep until that many have arrived (SO_RCVLOWAT) rather than
    wake for every segment."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


class NotClientHello(Exception):
    """The bytes are not a TLS ClientHello (plain HTTP on the TLS port, garbage)."""


class TooLarge(NotClientHello):
    """A ClientHello past MAX_CLIENT_HELLO or MAX_RECORDS: refuse it."""


class ClientHello(NamedTuple):
    server_name: bytes | None
    alpn: tuple[bytes, ...]


def _message_length(body: bytearray) -> int | None:
    """The ClientHello's total length (header included), once its header is in."""
    if len(body) < 4:
        return None
    if body[0] != _CLIENT_HELLO:
        raise NotClientHello("first handshake message is not a ClientHello")
    need = 4 + int.from_bytes(body[1:4], "big")
    if need > MAX_CLIENT_HELLO:
        raise TooLarge(f"ClientHello of {need} bytes")
    return need


def _handshake_bytes(data: bytes) -> bytes:
    """Join the payloads of the leading handshake records (a ClientHello may
    span several records, RFC 8446 §5.1) until the message is complete."""
    body = bytearray()
    pos = 0
    for _ in range(MAX_RECORDS):
        if len(data) < pos + 5:
            raise NeedMore(pos + 5)
        if data[pos] != _HANDSHAKE or data[pos + 1] != 3:
            raise NotClientHello("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > _MAX_RECORD:
            raise NotClientHello("bad TLS record length")
        end = pos + 5 + length
        # Take what arrived of a partial record only to learn the message length.
        body += data[pos + 5 : end]
        need = _message_length(body)
        if len(data) < end:
            # At least this record's end, and the rest of the message after it
            # (in one more record at best).
            missing = 0 if need is None else max(0, need - len(body) - (end - len(data)))
            raise NeedMore(end + (5 + missing if missing else 0))
        pos = end
        if need is not None and len(body) >= need:
            return bytes(body[4:need])
    raise TooLarge(f"ClientHello cut into more than {MAX_RECORDS} records")


def parse(data: bytes) -> ClientHello:
    """Return the ClientHello at the start of ``data``.

    Raises NeedMore when the bytes end before the message does, and
    NotClientHello when they cannot be one.
    """
    # The common case, read on every connection: the whole message in the
    # first record, parsed where it lies (no copy); anything else (several
    # records, a partial one, garbage) takes the general path.
    content_type, version, length, message_type, high, low = _HEADERS(data) if len(data) >= 9 else _NO_HEADERS
    if (content_type == _HANDSHAKE and version >> 8 == 3 and message_type == _CLIENT_HELLO
            and 4 <= length <= _MAX_RECORD and len(data) >= 5 + length
            and (end := 9 + (high << 16 | low)) <= 5 + length):
        buf, pos = data, 9
    else:
        buf = _handshake_bytes(data)
        pos, end = 0, len(buf)
    try:
        return _parse_body(buf, pos, end)
    except (IndexError, ValueError) as exc:
        raise NotClientHello(f"malformed ClientHello: {exc}") from None


def _parse_body(buf: bytes, pos: int, end: int) -> ClientHello:
    # legacy_version(2) random(32) session_id<0..32> cipher_suites<2..2^16-2>
    # legacy_compression_methods<1..2^8-1> extensions<8..2^16-1>. Each vector
    # is its length (1 or 2 bytes, RFC 8446 §3.4) and that many bytes: the
    # first three are stepped over inline (this runs per connection), and as
    # positions only grow, one check against ``end`` after them covers all three.
    pos += 34
    pos += 1 + buf[pos]
    pos += 2 + ((buf[pos] << 8) | buf[pos + 1])
    pos += 1 + buf[pos]
    if pos >= end:
        if pos == end:
            return ClientHello(None, ())  # no extensions at all (SSLv3-style hello)
        raise ValueError("vector runs past its parent")
    extensions_end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if extensions_end > end:
        raise ValueError("vector runs past its parent")
    pos += 2
    server_name: bytes | None = None
    alpn: tuple[bytes, ...] = ()
    while pos + 4 <= extensions_end:
        # Extension: type(2), extension_data<0..2^16-1> (RFC 8446 §4.2). This
        # loop runs some 15 times per connection: one C call reads the header,
        # and an extension running past the list is caught once, after it.
        ext_type, size = _EXTENSION_HEADER(buf, pos)
        pos += 4 + size
        if not ext_type:  # _EXT_SERVER_NAME (0)
            server_name = _server_name(buf, pos - size, pos)
        elif ext_type == _EXT_ALPN:
            alpn = _alpn(buf, pos - size, pos)
    if pos > extensions_end:
        raise ValueError("vector runs past its parent")
    return ClientHello(server_name, alpn)


def _server_name(buf: bytes, pos: int, end: int) -> bytes | None:
    # ServerNameList: server_name_list<1..2^16-1> of NameType(1), HostName<1..2^16-1> (RFC 6066 §3).
    list_end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if list_end > end:
        raise ValueError("vector runs past its parent")
    pos += 2
    while pos + 3 <= list_end:
        name_type = buf[pos]
        start = pos + 3
        pos = start + ((buf[pos + 1] << 8) | buf[pos + 2])
        if pos > list_end:
            raise ValueError("vector runs past its parent")
        if name_type == _HOST_NAME:
            return buf[start:pos]  # RFC 6066 §3: at most one name of each type
    return None


def _alpn(buf: bytes, pos: int, end: int) -> tuple[bytes, ...]:
    # ProtocolNameList: protocol_name_list<2..2^16-1> of ProtocolName<1..2^8-1> (RFC 7301 §3.1).
    list_end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if list_end > end:
        raise ValueError("vector runs past its parent")
    pos += 2
    out = []
    while pos < list_end:
        start = pos + 1
        pos = start + buf[pos]
        if pos > list_end:
            raise ValueError("vector runs past its parent")
        out.append(buf[start:pos])
    return tuple(out)
