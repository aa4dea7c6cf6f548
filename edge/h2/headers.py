"""Header blocks: HPACK (RFC 7541) with bounds, and the HTTP/2 rules on fields
(RFC 9113 §8.2, §8.3).

Bounds (the HPACK bomb): the dynamic table we let a client use is the 4096
octets of §6.5.2's default and never more; a decoded header list stops at
``hard_limit`` octets (counted as in §6.5.2: name + value + 32 per field),
after which the connection is closed (the table may be half-updated). Between
``limit`` and ``hard_limit`` the request is decoded and flagged too large, so
it can be answered 431 on its stream while the table stays in step.

A block made only of indexed fields changes no table state (RFC 7541 §6.1),
so it decodes to the same request as long as no other block changed the
table since: such blocks are cached (h2load and browsers repeat them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import hpack

from edge.h2.errors import ErrorCode, H2ConnectionError, H2StreamError

TABLE_SIZE = 4096  # §6.5.2 default SETTINGS_HEADER_TABLE_SIZE; what we advertise and allow
_CACHE_SIZE = 64
# §8.2.2: fields that make no sense in HTTP/2; a request carrying one is malformed.
CONNECTION_SPECIFIC = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
# §8.2.1: names are lower-case tokens (RFC 9110 §5.1); values hold no NUL, CR or LF
# and neither start nor end with whitespace.
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")

Fields = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Request:
    """A request head, checked (§8.3.1). ``fields`` holds the regular fields only."""

    method: bytes
    scheme: bytes
    authority: bytes
    path: bytes
    fields: Fields
    content_length: int | None
    size: int  # as §6.5.2 counts it
    too_large: bool


def _malformed(stream_id: int, reason: str) -> H2StreamError:
    return H2StreamError(stream_id, ErrorCode.PROTOCOL_ERROR, reason)  # §8.1.1


def _indexed_only(block: bytes) -> bool:
    """Every representation in the block is an indexed field (RFC 7541 §6.1)."""
    if min(block, default=0) >= 0x80 and 0xFF not in block:
        return True  # one octet per field: the common case
    i, n = 0, len(block)
    while i < n:
        octet = block[i]
        if not octet & 0x80:
            return False
        i += 1
        if octet & 0x7F == 0x7F:  # a multi-octet integer (RFC 7541 §5.1)
            while i < n and block[i] & 0x80:
                i += 1
            i += 1
    return True


def _check_field(stream_id: int, name: bytes, value: bytes) -> None:
    if not name or _BAD_NAME.search(name):
        raise _malformed(stream_id, "invalid field name")
    if _BAD_VALUE.search(value):
        raise _malformed(stream_id, "invalid field value")
    if name in CONNECTION_SPECIFIC:
        raise _malformed(stream_id, "connection-specific field")  # §8.2.2
    if name == b"te" and value.lower() != b"trailers":
        raise _malformed(stream_id, "TE other than trailers")


def _content_length(stream_id: int, values: list[bytes]) -> int | None:
    if not values:
        return None
    if any(not v.isdigit() or v != values[0] for v in values) or len(values[0]) > 18:
        raise _malformed(stream_id, "invalid content-length")
    return int(values[0])


def check_request(stream_id: int, decoded: list[tuple[bytes, bytes]], limit: int) -> Request:
    """RFC 9113 §8.3.1 and §8.2; a violation is a stream PROTOCOL_ERROR (§8.1.1)."""
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    lengths: list[bytes] = []
    size = 0
    for name, value in decoded:
        size += len(name) + len(value) + 32
        if name[:1] == b":":
            if fields:
                raise _malformed(stream_id, "pseudo-header after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise _malformed(stream_id, "unknown or response pseudo-header")
            if name in pseudo:
                raise _malformed(stream_id, "duplicate pseudo-header")
            if _BAD_VALUE.search(value):
                raise _malformed(stream_id, "invalid pseudo-header value")
            pseudo[name] = value
            continue
        _check_field(stream_id, name, value)
        if name == b"content-length":
            lengths.append(value)
        fields.append((name, value))
    method = pseudo.get(b":method", b"")
    if method == b"CONNECT":  # §8.5: only :method and :authority
        if b":scheme" in pseudo or b":path" in pseudo or not pseudo.get(b":authority"):
            raise _malformed(stream_id, "malformed CONNECT")
    elif not method or not pseudo.get(b":scheme") or not pseudo.get(b":path"):
        raise _malformed(stream_id, "missing or empty :method, :scheme or :path")
    authority = pseudo.get(b":authority", b"")
    return Request(
        method,
        pseudo.get(b":scheme", b""),
        authority,
        pseudo.get(b":path", b""),
        tuple(fields),
        _content_length(stream_id, lengths),
        size,
        size > limit,
    )


def check_trailers(stream_id: int, decoded: list[tuple[bytes, bytes]]) -> Fields:
    """§8.1: trailers carry no pseudo-header (§8.3) and no connection-specific field."""
    for name, value in decoded:
        if name[:1] == b":":
            raise _malformed(stream_id, "pseudo-header in trailers")
        _check_field(stream_id, name, value)
    return tuple(decoded)


class HeaderDecoder:
    """HPACK decoding with bounded table and list, and the indexed-block cache."""

    def __init__(self, limit: int, hard_limit: int) -> None:
        self.limit = limit
        self._decoder = hpack.Decoder(max_header_list_size=hard_limit)
        self._decoder.max_allowed_table_size = TABLE_SIZE
        self._cache: dict[bytes, Request] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Decode or raise a connection COMPRESSION_ERROR (RFC 9113 §4.3)."""
        try:
            decoded = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise H2ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header list too large") from exc
        except (hpack.HPACKError, IndexError, ValueError, TypeError) as exc:
            raise H2ConnectionError(ErrorCode.COMPRESSION_ERROR, f"HPACK: {exc}") from exc
        return [(bytes(n), bytes(v)) for n, v in decoded]

    def request(self, stream_id: int, block: bytes) -> Request:
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        indexed = _indexed_only(block)
        if not indexed:
            self._cache.clear()  # the table may change: cached blocks may decode differently
        # Decode before checking: the table must stay in step even if the request is malformed.
        request = check_request(stream_id, self.decode(block), self.limit)
        if indexed and len(self._cache) < _CACHE_SIZE:
            self._cache[block] = request
        return request


class HeaderEncoder:
    """HPACK encoding; our table never grows past 4096 octets whatever the peer allows."""

    def __init__(self) -> None:
        self._encoder = hpack.Encoder()

    def set_table_size(self, size: int) -> None:
        self._encoder.header_table_size = min(size, TABLE_SIZE)

    def encode(self, fields: list[tuple[bytes, bytes]]) -> bytes:
        return self._encoder.encode(fields)
