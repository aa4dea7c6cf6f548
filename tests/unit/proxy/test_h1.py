import pytest

from edge.proxy import h1
from edge.proxy.errors import HttpError


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], (None, False)),
        ([(b"content-length", b"10")], (10, False)),
        ([(b"content-length", b"10"), (b"content-length", b"10")], (10, False)),
        ([(b"content-length", b"10, 10")], (10, False)),
        ([(b"transfer-encoding", b"chunked")], (None, True)),
        ([(b"transfer-encoding", b"gzip, chunked")], (None, True)),
    ],
)
def test_framing(headers, expected):
    assert h1.check_framing(headers) == expected


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(b"content-length", b"10"), (b"transfer-encoding", b"chunked")], "both"),
        ([(b"content-length", b"10"), (b"content-length", b"11")], "conflicting"),
        ([(b"content-length", b"1, 2")], "conflicting"),
        ([(b"content-length", b"-1")], "invalid"),
        ([(b"content-length", b"0x10")], "invalid"),
        ([(b"transfer-encoding", b"chunked, gzip")], "does not end in chunked"),
    ],
)
def test_smuggling_refused(headers, reason):
    with pytest.raises(HttpError, match=reason) as exc:
        h1.check_framing(headers)
    assert exc.value.status == 400


def test_request_head_rewrites_forwarding_headers():
    head = h1.request_head(
        b"POST", b"/p?q=1",
        [(b"host", b"www.example.com"), (b"connection", b"keep-alive, x-private"), (b"x-private", b"1"),
         (b"keep-alive", b"timeout=5"), (b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-proto", b"spoof"),
         (b"content-length", b"3"), (b"accept", b"*/*")],
        host=b"www.example.com", client_ip=b"127.0.0.9", proto=b"https", port=b"443",
        request_id=b"rid", content_length=3, chunked=False, trusted=True,
    )
    text = head.decode()
    assert text.startswith("POST /p?q=1 HTTP/1.1\r\n")
    assert "x-private" not in text and "keep-alive" not in text.lower().replace("connection", "")
    assert "x-forwarded-for: 10.0.0.1, 127.0.0.9\r\n" in text
    assert "x-forwarded-proto: https\r\n" in text and "spoof" not in text
    assert "x-forwarded-port: 443\r\n" in text
    assert "x-request-id: rid\r\n" in text
    assert text.count("content-length: 3") == 1
    assert text.endswith("\r\n\r\n")


CLAIMS = [(b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=6.6.6.6"), (b"x-real-ip", b"6.6.6.6"),
          (b"X-Forwarded-For".lower(), b"7.7.7.7")]


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_for_replaced_from_untrusted_appended_from_trusted(trusted: bool):
    # SPEC §5 and issue #14: apps must be able to trust the first address.
    head = h1.request_head(b"GET", b"/", CLAIMS, host=b"h", client_ip=b"192.0.2.1", proto=b"https", port=b"443",
                           request_id=b"r", content_length=None, chunked=False, trusted=trusted).decode()
    if trusted:
        assert "x-forwarded-for: 6.6.6.6, 7.7.7.7, 192.0.2.1\r\n" in head
        assert "forwarded: for=6.6.6.6\r\n" in head and "x-real-ip: 6.6.6.6\r\n" in head
    else:
        assert "x-forwarded-for: 192.0.2.1\r\n" in head and "6.6.6.6" not in head and "7.7.7.7" not in head


def test_request_id_and_host_written_once_by_edge():
    head = h1.request_head(
        b"GET", b"/", [(b"host", b"h.test"), (b"x-request-id", b"abc")],
        host=b"h.test", client_ip=b"1.1.1.1", proto=b"https", port=b"443", request_id=b"abc",
        content_length=None, chunked=False,
    )
    assert head.count(b"x-request-id") == 1 and b"x-request-id: abc" in head
    assert head.count(b"host:") == 1


@pytest.mark.parametrize("named", [b"host", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto",
                                   b"x-forwarded-port", b"content-length"])
def test_connection_cannot_remove_what_edge_sets(named):
    """RFC 9110 §7.6.1 removes what Connection names, but never edge's own fields."""
    head = h1.request_head(
        b"POST", b"/", [(b"host", b"h.test"), (b"connection", b"close, " + named + b", x-drop"), (b"x-drop", b"1")],
        host=b"h.test", client_ip=b"1.1.1.1", proto=b"https", port=b"443", request_id=b"rid",
        content_length=3, chunked=False,
    ).lower()
    for field in (b"host: h.test", b"x-request-id: rid", b"x-forwarded-for: 1.1.1.1", b"x-forwarded-proto: https",
                  b"x-forwarded-port: 443", b"content-length: 3"):
        assert head.count(field) == 1, field
    assert b"x-drop" not in head


@pytest.mark.parametrize(
    ("values", "forwarded"),
    [
        ([b"websocket"], b"websocket"),
        ([b"WebSocket"], b"WebSocket"),
        ([b"h2c"], None),
        ([b"websocket, h2c"], None),
        ([b"websocket", b"H2C"], None),
        ([b"HTTP/2.0"], None),
        ([b"h2"], None),
        ([b"http/1.1, websocket"], None),
        ([b" , "], None),
    ],
)
def test_forwardable_upgrade(values, forwarded):
    assert h1.forwardable_upgrade([(b"upgrade", v) for v in values]) == forwarded


def test_host_added_when_absent():
    head = h1.request_head(
        b"GET", b"/", [], host=b"h.test", client_ip=b"1.1.1.1", proto=b"http", port=b"80",
        request_id=b"r", content_length=None, chunked=False, has_connection=False,
    )
    assert b"host: h.test\r\n" in head


def test_response_head_strips_hop_by_hop():
    head = h1.response_head(
        200, b"OK", [(b"connection", b"close"), (b"transfer-encoding", b"chunked"), (b"server", b"x")],
        content_length=None, chunked=True, keep_alive=True,
    )
    assert head == b"HTTP/1.1 200 OK\r\nserver: x\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("connection_first", [True, False])
def test_response_head_drops_fields_the_connection_field_names(connection_first):
    # RFC 9110 §7.6.1: wherever Connection comes, the fields it names are hop-by-hop.
    fields = [(b"x-hop", b"1"), (b"server", b"x"), (b"x-keep", b"2")]
    connection = (b"connection", b"keep-alive, X-Hop")
    headers = [connection, *fields] if connection_first else [*fields, connection]
    head = h1.response_head(200, b"OK", headers, content_length=5, chunked=False, keep_alive=False)
    assert head == b"HTTP/1.1 200 OK\r\nserver: x\r\nx-keep: 2\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"


def test_response_head_drops_a_field_named_by_connection_close():
    # "close" is a connection option (RFC 9110 §7.6.1): a field of that name is not relayed.
    head = h1.response_head(200, b"OK", [(b"connection", b"close"), (b"close", b"x")], content_length=0,
                            chunked=False, keep_alive=True)
    assert head == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def test_chunk():
    assert h1.chunk(b"hello") == b"5\r\nhello\r\n"
    assert h1.chunk(b"") == b""  # never a last-chunk by accident
    assert h1.LAST_CHUNK == b"0\r\n\r\n"
