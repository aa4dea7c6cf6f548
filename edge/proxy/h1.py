"""HTTP/1.1 message framing rules (RFC 9110, RFC 9112), apart from any I/O.

Pure functions on header lists: which headers are hop-by-hop, how a request
head is rewritten for the backend, how a response head is rewritten for the
client, and the checks that refuse request smuggling.
"""

from __future__ import annotations

from edge.proxy.errors import HttpError

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: hop-by-hop fields, plus those named in Connection.
# Proxy-Connection and Keep-Alive are legacy ones that must not be forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        # RFC 9113 §3.2.1 (RFC 7540 §3.2.1): connection-specific, only meaningful
        # with an h2c upgrade, which edge never forwards.
        b"http2-settings",
    }
)
# What edge writes itself on every forwarded request: Host (the one authority
# it routed by, RFC 9112 §3.2.2), the request id, X-Forwarded-*, and the
# framing it rewrites (RFC 9112 §6). The client's copies are never copied, so
# a Connection field naming them (RFC 9110 §7.6.1) cannot remove edge's own.
_SET_BY_EDGE = frozenset(
    {b"host", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port", b"content-length"}
)
_NOT_FORWARDED = HOP_BY_HOP | _SET_BY_EDGE
# From a client outside [server] trusted_proxies, what claims to name another
# client is dropped as well (RFC 7239 §8.1: a proxy should strip what it cannot
# vouch for), so the backend's first X-Forwarded-For address is edge's word.
_CLIENT_CLAIMS = frozenset({b"forwarded", b"x-real-ip"})
_NOT_FORWARDED_UNTRUSTED = _NOT_FORWARDED | _CLIENT_CLAIMS
# Upgrade protocols edge never switches to: another HTTP version on the same
# connection (h2c, RFC 7540 §3.2; "HTTP/2.0", RFC 9110 §7.8) would let the
# client talk to the backend past every rule of edge. "h2" is TLS-only (RFC
# 9113 §3.2) and never valid in Upgrade.
_UNSAFE_UPGRADES = frozenset({b"h2c", b"h2", b"http", b"https"})
# Response fields never relayed as they came: hop-by-hop ones, and the framing edge writes itself.
_NOT_RELAYED = HOP_BY_HOP | {b"content-length"}
# A Connection value that names no field besides hop-by-hop ones (what most backends send).
_PLAIN_CONNECTION = frozenset({b"keep-alive"})
# Request fields the proxy itself reads; the others pass through untouched.
FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update([t.strip().lower() for t in value.split(b",")])
    tokens.discard(b"")
    return tokens


def upgrade_protocols(headers: Headers) -> list[bytes]:
    """The protocol names (without version) of every Upgrade field, lower case."""
    names: list[bytes] = []
    for name, value in headers:
        if name == b"upgrade":
            names.extend(t.strip().split(b"/", 1)[0].strip().lower() for t in value.split(b",") if t.strip())
    return names


def solicited_upgrade(offered: bytes, headers: Headers) -> bool:
    """A 101's Upgrade names only protocols the forwarded request offered
    (RFC 9110 §15.2.2: a server switches only to a protocol the client listed)."""
    asked = upgrade_protocols([(b"upgrade", offered)])
    chosen = upgrade_protocols(headers)
    return bool(chosen) and all(p in asked for p in chosen)


def forwardable_upgrade(headers: Headers) -> bytes | None:
    """The Upgrade value to forward, or None when edge refuses the upgrade.

    Only protocols edge can pipe as opaque bytes (WebSocket, RFC 6455, and
    other non-HTTP protocols) go through. A list naming any HTTP version is
    refused whole: the request is then an ordinary one (RFC 9110 §7.8 lets a
    server ignore Upgrade).
    """
    protocols = upgrade_protocols(headers)
    if not protocols or any(p in _UNSAFE_UPGRADES for p in protocols):
        return None
    return b", ".join(v.strip() for n, v in headers if n == b"upgrade")


def check_framing(headers: Headers) -> tuple[int | None, bool]:
    """(Content-Length, chunked) of a request, refusing ambiguous framing.

    RFC 9112 §6.3: a message with both Transfer-Encoding and Content-Length
    is a smuggling attempt from a proxy's point of view (§6.1 says to treat it
    as an error or drop Content-Length; we refuse it). Several Content-Length
    values that differ are refused (§6.3 item 5). Transfer-Encoding must end
    in chunked for a request (§6.3 item 4).
    """
    length: int | None = None
    te: list[bytes] = []
    for name, value in headers:
        if name == b"content-length":
            for part in value.split(b","):
                part = part.strip()
                if not part.isdigit():
                    raise HttpError(400, "invalid Content-Length")
                n = int(part)
                if length is not None and n != length:
                    raise HttpError(400, "conflicting Content-Length values")
                length = n
        elif name == b"transfer-encoding":
            te.extend(t.strip().lower() for t in value.split(b",") if t.strip())
    if te:
        if length is not None:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if te[-1] != b"chunked":
            raise HttpError(400, "Transfer-Encoding does not end in chunked")
        return None, True
    return length, False


def request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    host: bytes,
    client_ip: bytes,
    proto: bytes,
    port: bytes,
    request_id: bytes,
    content_length: int | None,
    chunked: bool,
    upgrade: bytes | None = None,
    has_connection: bool = True,
    trusted: bool = False,
) -> bytes:
    """The request head sent to the backend (always HTTP/1.1 keep-alive).

    ``trusted``: the client is in ``[server] trusted_proxies`` (SPEC §5): its
    X-Forwarded-For is appended to and its Forwarded and X-Real-IP kept; from
    any other client they are dropped and X-Forwarded-For is its address alone.

    ``host``: the authority edge routed by (RFC 9112 §3.2.2), always written.
    ``request_id``: the X-Request-ID, the client's or a new one, always written.
    ``upgrade``: the protocol a client asked to switch to (RFC 9110 §7.8);
    Upgrade and Connection are then kept so the backend can answer 101.
    ``has_connection=False`` tells there is no Connection field to read.
    """
    skip = _NOT_FORWARDED if trusted else _NOT_FORWARDED_UNTRUSTED
    if has_connection:
        tokens = connection_tokens(headers)
        if not tokens <= skip:
            skip = skip | tokens
    out = [b"%b %b HTTP/1.1\r\n" % (method, target)]
    forwarded_for = b""
    for field in headers:  # one formatted piece per field (cheaper than four list items)
        name = field[0]
        if name in skip:
            if trusted and name == b"x-forwarded-for":
                forwarded_for = forwarded_for + b", " + field[1] if forwarded_for else field[1]
            continue
        out.append(b"%b: %b\r\n" % field)
    # From a trusted proxy appended, as nginx's $proxy_add_x_forwarded_for does.
    out.append(b"host: %b\r\nx-forwarded-for: %b\r\nx-forwarded-proto: %b\r\nx-forwarded-port: %b\r\n"
               b"x-request-id: %b\r\n"
               % (host, forwarded_for + b", " + client_ip if forwarded_for else client_ip, proto, port, request_id))
    if upgrade is not None:
        out.append(b"connection: upgrade\r\nupgrade: %b\r\n" % upgrade)
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n\r\n")
    elif content_length is not None:
        out.append(b"content-length: %d\r\n\r\n" % content_length)
    else:
        out.append(b"\r\n")
    return b"".join(out)


def response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    content_length: int | None,
    chunked: bool,
    keep_alive: bool,
) -> bytes:
    """The response head sent to the client. (One formatted piece per field: cheaper
    per response than four list items each; the hot path of every answer.)"""
    out = [b"HTTP/1.1 %d %b\r\n" % (status, reason or b"-")]
    named = False  # a Connection field may name other fields
    for field in headers:
        name = field[0]
        if name in _NOT_RELAYED:
            if name == b"connection" and field[1].lower() not in _PLAIN_CONNECTION:
                named = True
            continue
        out.append(b"%b: %b\r\n" % field)
    if named and not connection_tokens(headers) <= _NOT_RELAYED:
        # Connection names other fields (RFC 9110 §7.6.1): they are dropped too.
        drop = _NOT_RELAYED | connection_tokens(headers)
        out[1:] = [b"%b: %b\r\n" % field for field in headers if field[0] not in drop]
    if status == 101:
        # RFC 9110 §15.2.2: the 101 names the protocol switched to.
        upgrade = next((v for n, v in headers if n == b"upgrade"), b"")
        out.append(b"connection: upgrade\r\nupgrade: %b\r\n\r\n" % upgrade)
        return b"".join(out)
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    elif content_length is not None:
        out.append(b"content-length: %d\r\n" % content_length)
    out.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
    return b"".join(out)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1). No data, no chunk: an
    empty chunk is the last-chunk (RFC 9112 §7.1), which only the end of a
    message may write; an empty read must never look like one."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
# Fields a trailer section must not carry: framing, routing, and what edge
# itself writes (RFC 9110 §6.5.1).
_NOT_IN_TRAILERS = _NOT_FORWARDED_UNTRUSTED | {b"authorization", b"cookie", b"set-cookie"}


def last_chunk(trailers: Headers | None = None) -> bytes:
    """The end of a chunked body, with the request's trailer fields (RFC 9112 §7.1.2)."""
    if not trailers:
        return LAST_CHUNK
    kept = [n + b": " + v + b"\r\n" for n, v in trailers if n not in _NOT_IN_TRAILERS]
    return b"0\r\n" + b"".join(kept) + b"\r\n"
