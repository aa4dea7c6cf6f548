"""Header blocks: HPACK (RFC 7541) with bounds, and the HTTP/2 rules on fields
(RFC 9113 §8.2, §8.3).

Bounds (the HPACK bomb): the dynamic table we let a client use is the 4096
octets of §6.5.2's default and never more; a decoded header list stops at
``hard_limit`` octets (counted as in §6.5.2: name + value + 32 per field),
after which the connection is closed (the table may be half-updated). Between
``limit`` and ``hard_limit`` the request is decoded and flagged too large, so
it can be answered 431 on its stream while the table stays in step.

A block made only of indexed fields and literals that are not indexed changes
no table state (RFC 7541 §6.1, §6.2.2, §6.2.3), so it decodes to the same
request as long as no other block changed the table since: such blocks are
cached (clients repeat them; nghttp2 never indexes :path, for one).
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
_NOTED = frozenset({b"host", b"x-request-id", b"cookie"})
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
    host: bytes | None = None  # a Host field, when the client sent one beside or instead of :authority
    request_id: bytes = b""  # an X-Request-ID field, when sent
    h1_fields: Fields = ()  # ``fields`` for an HTTP/1.1 hop: cookies joined again (§8.2.3)


def _malformed(stream_id: int, reason: str) -> H2StreamError:
    return H2StreamError(stream_id, ErrorCode.PROTOCOL_ERROR, reason)  # §8.1.1


def _integer(block: bytes, i: int, mask: int) -> tuple[int, int]:
    """(value, index past it) of the integer at ``i`` with a prefix of ``mask`` (RFC 7541 §5.1)."""
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while i < len(block):
        octet = block[i]
        i += 1
        value += (octet & 0x7F) << shift
        shift += 7
        if not octet & 0x80:
            break
    return value, i


def _skip_string(block: bytes, i: int) -> int:
    """Past a string literal (RFC 7541 §5.2); -1 when it runs off the block."""
    if i >= len(block):
        return -1
    length, i = _integer(block, i, 0x7F)
    return i + length if i + length <= len(block) else -1


def _leaves_table_alone(block: bytes) -> bool:
    """The block changes no decoder state: only indexed fields (RFC 7541 §6.1) and
    literals without indexing or never indexed (§6.2.2, §6.2.3); no literal with
    incremental indexing (§6.2.1), no table size update (§6.3)."""
    if min(block, default=0) >= 0x80 and 0xFF not in block:
        return True  # one octet per indexed field: the common case
    i, n = 0, len(block)
    while i < n:
        octet = block[i]
        if octet & 0x80:
            i = _integer(block, i, 0x7F)[1]
            continue
        if octet & 0xE0:  # 01xxxxxx or 001xxxxx: the table changes
            return False
        literal_name = octet & 0x0F == 0
        i = _integer(block, i, 0x0F)[1]
        if literal_name:
            i = _skip_string(block, i)
            if i < 0:
                return False
        i = _skip_string(block, i)
        if i < 0:
            return False
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
    noted = {name: value for name, value in fields if name in _NOTED}
    h1_fields = tuple(fields)
    cookies = [v for n, v in fields if n == b"cookie"] if b"cookie" in noted else []
    if len(cookies) > 1:  # §8.2.3: one field again for HTTP/1.1
        h1_fields = (*((n, v) for n, v in fields if n != b"cookie"), (b"cookie", b"; ".join(cookies)))
    return Request(
        method,
        pseudo.get(b":scheme", b""),
        authority,
        pseudo.get(b":path", b""),
        tuple(fields),
        _content_length(stream_id, lengths),
        size,
        size > limit,
        noted.get(b"host"),
        noted.get(b"x-request-id", b""),
        h1_fields,
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
        indexed = _leaves_table_alone(block)
        if not indexed:
            self._cache.clear()  # the table may change: cached blocks may decode differently
        # Decode before checking: the table must stay in step even if the request is malformed.
        request = check_request(stream_id, self.decode(block), self.limit)
        if indexed and len(self._cache) < _CACHE_SIZE:
            self._cache[block] = request
        return request
