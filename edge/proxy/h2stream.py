"""One HTTP/2 stream's request and response, forwarded to an HTTP/1.1 backend.

The stream is the ``ResponseSink`` of its backend connection, as an HTTP/1.1
exchange is: head, body pieces, completion and failure arrive here and go
out as HEADERS and DATA on this stream only. Routing is ``decide``'s, the
backend head is ``h1.request_head``'s, exactly as for HTTP/1.1.

Back-pressure per stream: response DATA waits for the client's windows in
the connection's per-stream queue; past ``STREAM_HIGH_WATER`` queued bytes
this stream's backend is paused, and resumed when the queue drains. A client
that does not read one stream holds back that stream's backend only. The
other way, request DATA is given back to the client's window only once the
backend connection takes it, so a slow backend slows that upload only.
"""

from __future__ import annotations

import logging
import time
from enum import Enum, auto
from typing import TYPE_CHECKING

from edge.h2.errors import ErrorCode
from edge.h2.headers import Request
from edge.proxy import h1
from edge.proxy.controls import (
    answer_head_fields,
    answer_page,
    count_done,
    count_upstream_error,
    rate_wait,
    with_hsts,
)
from edge.proxy.decide import Action, decide
from edge.proxy.errors import error_body
from edge.proxy.exchange import log_access
from edge.proxy.forwarding import IDEMPOTENT, next_request_id, obtain_connection
from edge.proxy.responses import STATUS_FOR
from edge.proxy.upstream import BackendConnection, Pool, UpstreamError
from edge.records import App

if TYPE_CHECKING:
    from edge.proxy.h2proto import H2ProxyProtocol

log = logging.getLogger("edge.proxy.h2")

# Response bytes queued for one stream (its client window is shut) before its
# backend is paused. With one backend read (64 KiB) on top, 100 streams whose
# client reads nothing hold ~8 MiB.
STREAM_HIGH_WATER = 16 * 1024
_BUFFER_LIMIT = 256 * 1024  # request body held while the backend connection is being made
# RFC 9113 §8.2.2: connection-specific fields never go into an HTTP/2 response.
_NOT_IN_H2 = h1.HOP_BY_HOP | {b"content-length"}


class Phase(Enum):
    ROUTING = auto()  # the head arrived; where it goes is being decided
    CONNECTING = auto()  # waiting for a backend connection
    SENT = auto()  # the request head is with the backend
    RESPONDING = auto()  # the response head went to the client
    DONE = auto()
    ABORTED = auto()  # reset, by the client or by us


class H2Exchange:
    """A stream's request and response; what ``log_access`` reads too."""

    __slots__ = (
        "app",  # issue #14: the app routed to
        "backend", "backend_full", "body", "buffered", "chunked", "conn", "deadline", "headers", "host", "method",
        "paused", "phase", "proto", "request", "request_done", "request_id", "response_bytes", "retry_head", "sid",
        "status", "t0", "target", "unacked",
    )
    version = "2"

    def __init__(self, proto: H2ProxyProtocol, sid: int, request: Request, end_stream: bool) -> None:
        self.proto = proto
        self.sid = sid
        self.phase = Phase.ROUTING
        self.method = request.method
        self.target = request.path
        self.headers = request.h1_fields
        self.request = request
        self.request_done = end_stream
        self.host = ""
        self.app: App | None = None  # the app routed to (per-app settings and series)
        self.backend = ""
        self.request_id = b""
        self.status = 0
        self.response_bytes = 0
        self.t0 = time.monotonic()
        self.conn: BackendConnection | None = None
        self.body: list[bytes] | None = []  # request body held until a backend connection is ready
        self.buffered = 0
        self.chunked = False  # the request goes to the backend chunked (no content-length, a body)
        self.unacked = 0  # request body bytes the backend has not taken yet (flow control)
        self.backend_full = False
        self.paused = False  # the backend is paused: this stream's client is not reading
        self.retry_head = b""
        self.deadline = 0.0

    # --- the request ----------------------------------------------------------------
    def start(self) -> None:
        request, proto = self.request, self.proto
        config = proto.config
        if request.too_large:
            self.answer(431)
            return
        if len(request.path) > config.max_uri_bytes:
            self.answer(414)
            return
        if request.path[:1] != b"/" and not (request.path == b"*" and self.method == b"OPTIONS"):
            self.answer(400)  # RFC 9113 §8.3.1: origin-form, or * for OPTIONS
            return
        authority = request.authority or request.host
        if proto.shared.rate is not None:
            wait = rate_wait(proto.shared.rate, proto.peer, proto.client_ip)
            if wait:
                self.answer(429, wait)
                return
        sni = proto.tls.server_name if proto.tls is not None else None
        hosts = 1 if authority is not None else 0
        decision = decide(proto.shared.router, self.method, request.path, authority, hosts, "1.1", sni, plain=False)
        if decision.authority is not None:
            self.host = decision.host
        self.app = decision.app
        if decision.action is not Action.FORWARD:
            self.answer(decision.status or 404)
            return
        assert decision.authority is not None and decision.pool is not None
        self.request_id = request.request_id or next_request_id()
        length = request.content_length
        self.chunked = length is None and not self.request_done
        head = h1.request_head(
            self.method, decision.authority.target, self.headers, host=decision.authority.host,
            client_ip=proto.client_ip, proto=proto.listener.scheme, port=proto.listener.port,
            request_id=self.request_id, content_length=length, chunked=self.chunked, has_connection=False,
            trusted=proto.peer is not None and proto.peer.trusted,
        )
        if self.method in IDEMPOTENT and self.request_done:
            self.retry_head = head
        self.dispatch(decision.pool, head)

    def dispatch(self, pool: Pool, head: bytes) -> None:
        backend = pool.pick()
        conn = backend.take_idle()
        if conn is not None:
            self.backend = backend.address
            self.attach(conn, head)
            return
        self.phase = Phase.CONNECTING
        self.proto.spawn(self.connect(pool, backend, head))

    async def connect(self, pool: Pool, first: object, head: bytes) -> None:
        conn, address, error = await obtain_connection(pool.candidates(first=first), self.proto.config)
        if self.phase is not Phase.CONNECTING:
            if conn is not None:
                conn.close()
            return
        if conn is None:
            assert error is not None
            self.upstream_error(error)
            return
        self.backend = address
        self.attach(conn, head)
        self.proto.flush()

    def attach(self, conn: BackendConnection, head: bytes) -> None:
        self.phase = Phase.SENT
        self.conn = conn
        conn.start(self, head_only=self.method == b"HEAD")
        body, self.body = self.body, None
        conn.write(head)
        if body:
            conn.write(b"".join(h1.chunk(b) for b in body) if self.chunked else b"".join(body))
        self.give_back()
        if self.request_done and self.chunked:
            conn.write(h1.LAST_CHUNK)
        if not conn.reused:
            self.retry_head = b""
        self.deadline = self.proto.now() + self.proto.config.response_timeout  # the connection's tick checks it
        self.proto.watch()

    def request_body(self, data: bytes, end: bool) -> None:
        n = len(data)
        if self.phase is Phase.DONE or self.phase is Phase.ABORTED:
            self.proto.h2.ack_data(self.sid, n)  # nobody wants it; the window stays open
            return
        if n:
            self.unacked += n
            if self.body is not None:
                self.body.append(data)
                self.buffered += n
            elif self.conn is not None:
                self.conn.write(h1.chunk(data) if self.chunked else data)
            self.give_back()
        if end:
            self.request_done = True
            if self.body is None and self.conn is not None and self.chunked:
                self.conn.write(h1.LAST_CHUNK)

    def request_trailers(self, fields: tuple[tuple[bytes, bytes], ...]) -> None:
        """Trailers go to the backend in the chunked body's trailer section (RFC 9112 §7.1.2)."""
        if self.chunked and self.conn is not None and self.body is None:
            self.conn.write(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n")
            self.request_done = True
            return
        self.request_body(b"", True)

    def give_back(self) -> None:
        """Request bytes left edge (or are few enough to hold): the client may send
        as many more (RFC 9113 §6.9). Not while the backend is full."""
        if self.unacked and not self.backend_full and (self.body is None or self.buffered < _BUFFER_LIMIT):
            self.proto.h2.ack_data(self.sid, self.unacked)
            self.unacked = 0

    # --- ResponseSink: what the backend connection calls ------------------------------
    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      keep_alive: bool, chunked: bool, content_length: int | None) -> None:
        if self.phase is not Phase.SENT:
            return
        if status < 200:
            if status != 101:  # 100 Continue, 103 Early Hints: interim HEADERS (RFC 9113 §8.1); 101 has no meaning
                self.proto.h2.send_headers(self.sid, _response_fields(status, headers, None))
            return
        self.phase = Phase.RESPONDING
        self.status = status
        self.retry_head = b""
        no_body = self.method == b"HEAD" or status in (204, 304)
        length = content_length if (no_body or not chunked) else None
        if self.app is not None and self.app.hsts:
            headers = with_hsts(headers, self.app)  # HTTP/2 is TLS only here: always HTTPS
        self.proto.h2.send_headers(self.sid, _response_fields(status, headers, length), end_stream=no_body)
        if no_body:
            self.finish(ended=True)

    def response_body(self, data: bytes) -> None:
        if self.phase is not Phase.RESPONDING or not data:
            return
        self.response_bytes += len(data)
        self.deadline = self.proto.now() + self.proto.config.response_timeout
        h2 = self.proto.h2
        h2.send_data(self.sid, data)
        if h2.buffered(self.sid) > STREAM_HIGH_WATER or self.proto.write_paused:
            self.hold()

    def hold(self) -> None:
        """Pause this stream's backend (its client, or the whole connection, is behind)."""
        if not self.paused and self.conn is not None:
            self.paused = True
            self.conn.pause_reading()

    def response_complete(self) -> None:
        if self.phase is Phase.RESPONDING:
            self.proto.h2.send_data(self.sid, b"", end_stream=True)
        conn, self.conn = self.conn, None
        if conn is not None and not self.request_done:
            conn.close()  # the backend would read the rest of the body as a new request
        self.finish(ended=True)

    def upstream_failed(self, error: UpstreamError) -> None:
        self.conn = None
        if self.phase is Phase.RESPONDING:
            log.info("upstream %s mid-response: %s", error.kind, error)
            self.proto.shared.stats.upstream_error(error.kind)
            count_upstream_error(self.app, self.proto.shared.app_stats, error.kind)
            self.abort(ErrorCode.INTERNAL_ERROR)  # the client must see the response cut short
            return
        if error.kind == "reset" and self.retry_head:
            head, self.retry_head = self.retry_head, b""
            app = self.proto.shared.router.app_for(self.host)
            if app is not None:
                self.body = []
                self.phase = Phase.CONNECTING
                pool = self.proto.shared.router.pool_for(app)
                self.proto.spawn(self.connect(pool, pool.pick(), head))
                return
        self.upstream_error(error)

    def upstream_error(self, error: UpstreamError) -> None:
        log.info("upstream %s: %s", error.kind, error)
        self.proto.shared.stats.upstream_error(error.kind)
        count_upstream_error(self.app, self.proto.shared.app_stats, error.kind)
        self.answer(STATUS_FOR.get(error.kind, 502))

    def batch_begin(self) -> None:
        self.proto.batch_begin()

    def batch_end(self) -> None:
        self.proto.batch_end()

    def upstream_pause(self) -> None:
        self.backend_full = True  # request DATA is no longer given back: the client waits

    def upstream_resume(self) -> None:
        self.backend_full = False
        if self.unacked:
            self.give_back()
            self.proto.flush()

    # --- the connection's calls ---------------------------------------------------------
    def window_opened(self) -> None:
        """The client read some of this stream: resume its backend below the mark."""
        self.deadline = self.proto.now() + self.proto.config.response_timeout
        if self.paused and not self.proto.write_paused and self.proto.h2.buffered(self.sid) <= STREAM_HIGH_WATER // 2:
            self.paused = False
            if self.conn is not None:
                self.conn.resume_reading()

    def timed_out(self) -> None:
        if self.phase is Phase.SENT:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self.answer(504)  # the backend has not answered in time (RFC 9110 §15.6.5)
        elif self.phase is Phase.RESPONDING:
            # Stalled: the backend stopped sending, or the client stopped reading this stream.
            self.abort(ErrorCode.CANCEL)

    # --- ends ---------------------------------------------------------------------------
    def answer(self, status: int, retry_after: int = 0) -> None:
        """An answer edge writes itself (errors), as a small HTML page (the
        app's own for 502-504, the maintenance page; issue #14)."""
        if self.phase in (Phase.RESPONDING, Phase.DONE, Phase.ABORTED) or self.sid not in self.proto.h2.streams:
            return
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.phase = Phase.RESPONDING
        self.status = status
        page, retry = answer_page(self.app, status)
        body = page or error_body(status)
        self.response_bytes = len(body)
        fields = [(b":status", b"%d" % status), (b"content-type", b"text/html; charset=utf-8"),
                  (b"content-length", b"%d" % len(body)), (b"cache-control", b"no-store")]
        if self.app is not None or retry_after:
            fields += answer_head_fields(self.app, status, True, retry_after or retry)
        h2 = self.proto.h2
        h2.send_headers(self.sid, fields)
        h2.send_data(self.sid, b"" if self.method == b"HEAD" else body, end_stream=True)
        self.finish(ended=True)

    def abort(self, code: ErrorCode) -> None:
        """Reset the stream (we cannot finish it) and let go of the backend."""
        if self.phase is Phase.DONE or self.phase is Phase.ABORTED:
            return
        self.proto.h2.reset_stream(self.sid, code)
        self.reset()

    def reset(self) -> None:
        """The stream is gone (RST_STREAM either way): drop the backend, log it."""
        if self.phase is Phase.DONE or self.phase is Phase.ABORTED:
            return
        self.phase = Phase.ABORTED
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.finish(ended=False)

    def finish(self, ended: bool) -> None:
        """The answer is complete (``ended``) or the stream reset. A request body
        still coming is read and dropped (its window given back): the stream stays
        half-closed until the client ends it, so its frames are still checked.
        (RFC 9113 §8.1 allows RST_STREAM NO_ERROR instead; clients would then see
        the frames they had in flight ignored, which h2spec counts as a failure.)"""
        if ended:
            self.phase = Phase.DONE
        proto = self.proto
        seconds = time.monotonic() - self.t0
        proto.shared.stats.request_done(self.status or 499, seconds, "2")
        count_done(self.app, proto.shared.app_stats, self.status or 499, seconds)
        if proto.shared.access_log:
            source = proto.tls.source.value if proto.tls else ""
            log_access(self, proto.client_ip, proto.tls_version, source,  # type: ignore[arg-type]
                       proto.shared.access_format)
        proto.exchange_done(self)


def _response_fields(status: int, headers: h1.Headers, length: int | None) -> list[tuple[bytes, bytes]]:
    drop = h1.connection_tokens(headers)
    out = [(b":status", b"%d" % status)]
    out += [(n, v) for n, v in headers if n not in _NOT_IN_H2 and n not in drop]
    if length is not None:
        out.append((b"content-length", b"%d" % length))
    return out

