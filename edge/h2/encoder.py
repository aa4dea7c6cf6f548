"""A stateless HPACK encoder for response heads (RFC 7541).

Fields are written as indexed fields when the static table holds the exact
pair (``:status: 200``), else as literals without indexing with the static
table's name index when it has the name (§6.2.2), never Huffman-coded, never
in the dynamic table. Each field's encoding then depends on nothing but the
field, so it is cached: a response head is a few dictionary hits and a join
(``hpack.Encoder`` costs ~5 µs a head and was the largest cost of an answer).
The price is a few bytes per head that a dynamic table would save; nginx
encodes its responses the same way.

With no dynamic table in use, the peer's SETTINGS_HEADER_TABLE_SIZE only
matters when it lowers the size: the next block then starts with a dynamic
table size update (RFC 7541 §4.2, §6.3).
"""

from __future__ import annotations

from hpack.table import HeaderTable

_STATIC = HeaderTable.STATIC_TABLE
_EXACT = {pair: i for i, pair in reversed(list(enumerate(_STATIC, 1)))}
_NAMES = {name: i for i, (name, _) in reversed(list(enumerate(_STATIC, 1)))}
_CACHE_LIMIT = 4096


def integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1; ``first`` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(name: bytes, value: bytes) -> bytes:
    index = _EXACT.get((name, value))
    if index is not None:
        return integer(index, 7, 0x80)  # §6.1
    name_index = _NAMES.get(name)
    head = integer(name_index, 4) if name_index else b"\x00" + integer(len(name), 7) + name  # §6.2.2
    return head + integer(len(value), 7) + value


class StatelessEncoder:
    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._size_update = b""

    def set_table_size(self, size: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE; below the default 4096, say we comply."""
        if size < 4096:
            self._size_update = integer(size, 5, 0x20)

    def encode(self, fields: list[tuple[bytes, bytes]]) -> bytes:
        cache = self._cache
        parts = [self._size_update] if self._size_update else []
        self._size_update = b""
        for field in fields:
            encoded = cache.get(field)
            if encoded is None:
                encoded = _field(*field)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[field] = encoded
            parts.append(encoded)
        return b"".join(parts)
