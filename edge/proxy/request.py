"""One request and its response, for HTTP/1.1 connections and HTTP/2 streams alike.

A ``Request`` owns what both protocols share per request: its head and
framing, the routing decision, the forwarded head, the backend connection,
the response's status and length, the access-log and metrics fields, and
its phase. It is the ``ResponseSink`` of its backend connection: the
backend side calls it only. It drives the client side through the small
``Downstream`` interface, implemented once by the HTTP/1.1 connection
(``protocol``) and once for HTTP/2 streams (``h2proto``): send head, send
body, end, abort, pause, resume. So every rule of SPEC §5 is written once.

Its phase moves along ``phase.NEXT`` only (as h11 does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from edge.proxy import forwarding, h1
from edge.proxy.answers import challenge_answer, error_answer, redirect_answer
from edge.proxy.controls import count_upstream_error, with_hsts
from edge.proxy.downstream import CLOSING_STATUSES
from edge.proxy.errors import phrase
from edge.proxy.exchange import log_access
from edge.proxy.phase import NEXT, IllegalTransition, Phase
from edge.proxy.upstream import BackendConnection, UpstreamError

if TYPE_CHECKING:
    from edge.proxy.downstream import Downstream
    from edge.records import App

log = logging.getLogger("edge.proxy")

# What a failed exchange with a backend answers (RFC 9110 §15.6.3, §15.6.5).
STATUS_FOR = {"refused": 502, "reset": 502, "protocol": 502, "closed": 502, "timeout": 504}
# Body bytes held while the backend connection is being made; past this the
# client's reading of the body is paused, so an upload never sits in memory.
BUFFER_LIMIT = 256 * 1024
_HEAD, _ROUTING, _CONNECTING, _SENT = Phase.HEAD, Phase.ROUTING, Phase.CONNECTING, Phase.SENT
_RESPONDING, _TUNNEL, _DONE, _ABORTED = Phase.RESPONDING, Phase.TUNNEL, Phase.DONE, Phase.ABORTED
_ENDED = _DONE | _ABORTED
_WAITING = _ROUTING | _CONNECTING | _SENT  # no response head yet: an answer can still be given


class Request:
    __slots__ = (
        "app", "backend", "backend_paused", "body", "body_expected", "body_held", "buffered", "chunked", "conn",
        "content_length", "deadline", "downstream", "has_connection", "headers", "host", "host_header",
        "host_headers", "keep_alive", "method", "phase", "request_done", "request_id", "response_bytes",
        "retry_head", "sid", "status", "t0", "target", "trailers", "unacked", "upgrade", "upgrade_to", "version",
    )

    def __init__(self, downstream: Downstream, method: bytes = b"", target: bytes = b"",
                 headers: h1.Headers | None = None, version: str = "1.1") -> None:
        self.downstream = downstream
        self.phase = _HEAD
        self.sid = 0  # the HTTP/2 stream id
        self.method = method
        self.target = target
        self.headers: h1.Headers = [] if headers is None else headers
        self.version = version  # "1.0", "1.1" or "2"
        self.host_header: bytes | None = None  # the authority as sent (Host, or :authority)
        self.host_headers = 0
        self.has_connection = False  # a Connection field came (its tokens name fields to drop)
        self.request_id = b""
        self.content_length: int | None = None
        self.chunked = False  # the body goes to the backend chunked
        self.body_expected = False
        self.request_done = False  # the whole request body arrived
        self.keep_alive = True  # HTTP/1.x: the client's wish, then edge's decision (``keeps_alive``)
        # An HTTP/1.1 Upgrade request: llhttp parses nothing after its head, so
        # the connection ends with it, whether or not it switches.
        self.upgrade = False
        self.upgrade_to: bytes | None = None  # the Upgrade value forwarded; None: not an upgrade for edge
        self.trailers: h1.Headers | None = None  # request trailers held until the body goes out
        self.host = ""
        self.app: App | None = None  # the app routed to, once known (per-app controls and series)
        self.backend = ""
        self.conn: BackendConnection | None = None
        self.body: list[bytes] | None = []  # body pieces read before a backend connection is ready
        self.buffered = 0
        self.retry_head = b""  # the head to send again on a retry; empty: not retryable
        self.backend_paused = False  # the backend's reads wait: the client is not reading the response
        self.status = 0
        self.response_bytes = 0
        self.t0 = time.monotonic()
        self.deadline = 0.0  # HTTP/2: when the response stalls (the connection's tick checks it)
        self.unacked = 0  # HTTP/2: request body bytes read and not yet given back to the client's window
        self.body_held = False  # the client's request body waits (``Downstream.pause``)

    def to(self, phase: Phase) -> None:
        if not NEXT[self.phase] & phase:
            raise IllegalTransition(self.phase, phase)
        self.phase = phase

    # --- the request, from the client ----------------------------------------------------
    def start(self, refused: int = 0) -> None:
        """The head is complete: answer ``refused`` if not 0, else route it (``forwarding``)."""
        if not NEXT[self.phase] & _ROUTING:  # self.to, inline on the hot path
            raise IllegalTransition(self.phase, _ROUTING)
        self.phase = _ROUTING
        if refused:
            self.answer(refused)
        else:
            forwarding.route(self)

    def request_body(self, data: bytes) -> bool:
        """A piece of the request body, in order; False: nobody wants it (answered already)."""
        if self.phase & _ENDED:
            return False
        if self.body is not None:
            self.body.append(data)
            self.buffered += len(data)
            if self.buffered > BUFFER_LIMIT:
                self.hold_body()
        elif self.conn is not None:
            self.conn.write(h1.chunk(data) if self.chunked else data)
        return True

    def request_end(self, trailers: h1.Headers | None = None) -> None:
        """The request is complete. Trailers reach the backend only in a chunked
        body's trailer section (RFC 9112 §7.1.2); with a Content-Length there is no
        place for them, and they are dropped (RFC 9110 §6.5.1 lets a proxy)."""
        self.request_done = True
        if self.phase & _ENDED:
            return
        if self.body is None and self.conn is not None:
            if self.chunked:
                self.conn.write(h1.last_chunk(trailers))
        elif trailers:
            self.trailers = trailers  # sent after the body held for the backend

    # --- the backend connection ------------------------------------------------------------
    def wait_for(self, connecting: Coroutine[Any, Any, None]) -> None:
        """No idle connection to the backend: ``connecting`` makes one (``forwarding.connect``)."""
        self.to(_CONNECTING)
        self.downstream.spawn(connecting)

    def connected(self, conn: BackendConnection | None, address: str, error: UpstreamError | None,
                  head: bytes) -> None:
        if self.phase is not _CONNECTING:
            if conn is not None:
                conn.close()  # answered meanwhile (timeout), or the client left
            return
        if conn is None:
            assert error is not None
            self.upstream_error(error)
            return
        self.backend = address
        self.attach(conn, head)

    def attach(self, conn: BackendConnection, head: bytes) -> None:
        """Send the request on ``conn``; its response comes back here."""
        if not NEXT[self.phase] & _SENT:  # self.to, inline on the hot path
            raise IllegalTransition(self.phase, _SENT)
        self.phase = _SENT
        self.conn = conn
        conn.start(self, self.method == b"HEAD")  # head_only
        downstream = self.downstream
        body, self.body = self.body, None
        if self.body_held:
            self.release_body()  # before the writes: a backend that fills up holds it again
        conn.write(head)
        if body:
            conn.write(b"".join([h1.chunk(b) for b in body]) if self.chunked else b"".join(body))
        if self.request_done and self.chunked:
            conn.write(h1.last_chunk(self.trailers))
        if downstream.write_paused:
            self.hold()
        if not conn.reused:
            self.retry_head = b""  # a fresh connection that fails is not a stale one
        downstream.waiting(self)

    # --- ResponseSink: what the backend connection calls ---------------------------------
    def response_head(self, status: int, reason: bytes, headers: h1.Headers,
                      keep_alive: bool, chunked: bool, content_length: int | None) -> None:
        if self.phase is not _SENT:
            return
        if status == 101:
            self._switch(reason, headers)
            return
        if status < 200:
            # Interim answers (100 Continue, 103 Early Hints) go straight through (RFC 9110 §15.2).
            self.downstream.send_head(self, status, reason, headers, None, False)
            return
        self.phase = _RESPONDING  # from SENT, checked above
        self.status = status
        self.retry_head = b""
        no_body = self.method == b"HEAD" or status == 204 or status == 304  # bodiless(), inline
        length = content_length if no_body or not chunked else None
        if self.app is not None and self.app.hsts and self.downstream.tls is not None:
            headers = with_hsts(headers, self.app)  # RFC 6797 §7.2: HTTPS only
        self.downstream.send_head(self, status, reason, headers, length, no_body)

    def response_body(self, data: bytes) -> None:
        if not data:
            return  # nothing to send; an empty chunk would be the last-chunk (RFC 9112 §7.1)
        phase = self.phase
        if phase is _RESPONDING:
            self.response_bytes += len(data)
            self.downstream.send_body(self, data)
        elif phase is _TUNNEL:
            self.downstream.send_body(self, data)

    def response_complete(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not self.request_done:
            # Answered before the whole request body went out: the backend
            # would read the rest of it as the next request. Never pooled.
            conn.close()
        if self.phase is _RESPONDING:
            self._complete()

    def upstream_failed(self, error: UpstreamError) -> None:
        self.conn = None
        phase = self.phase
        if phase is _TUNNEL:
            self.to(_DONE)
            self.downstream.abort(self, error)
        elif phase is _RESPONDING:
            self._cut(error)
        elif phase & _WAITING:
            if error.kind == "reset" and self.retry_head and forwarding.retry(self):
                return  # a reused keep-alive connection the backend had closed meanwhile
            self.upstream_error(error)

    def upstream_error(self, error: UpstreamError) -> None:
        """No response from the backend: answer 502 or 504."""
        log.info("upstream %s: %s", error.kind, error)
        shared = self.downstream.shared
        shared.stats.upstream_error(error.kind)
        count_upstream_error(self.app, shared.app_stats, error.kind)
        self.answer(STATUS_FOR.get(error.kind, 502))

    def upstream_pause(self) -> None:
        self.hold_body()

    def upstream_resume(self) -> None:
        self.release_body()

    # --- back-pressure ------------------------------------------------------------------------
    def hold_body(self) -> None:
        """The backend is not taking the request body, or enough of it is held: the client waits."""
        if not self.body_held:
            self.body_held = True
            self.downstream.pause(self)

    def release_body(self) -> None:
        if self.body_held:
            self.body_held = False
            self.downstream.resume(self)

    def hold(self) -> None:
        """The client is behind: the backend's reads wait."""
        if not self.backend_paused and self.conn is not None:
            self.backend_paused = True
            self.conn.pause_reading()

    def release(self) -> None:
        if self.backend_paused:
            self.backend_paused = False
            if self.conn is not None:
                self.conn.resume_reading()

    # --- answers edge makes itself -------------------------------------------------------
    def answer(self, status: int, retry_after: int = 0) -> None:
        """An error answer (the app's own page or the maintenance page, issue #14)."""
        if not self.phase & _WAITING:
            return
        self.drop_backend()
        if status in CLOSING_STATUSES:
            self.keep_alive = False  # the request stream cannot be trusted after it
        fields, body = error_answer(self.app, status, self.downstream.tls is not None, retry_after)
        self.respond(status, fields, body)

    def redirect(self) -> None:
        self.respond(301, redirect_answer(self.host, self.target, self.downstream.listener.https_port), b"")

    async def challenge(self, lookup: Callable[[str], Awaitable[bytes | None]]) -> None:
        """An ACME HTTP-01 key authorization (RFC 8555 §8.3), or 404."""
        value = await challenge_answer(lookup, self.target)
        if self.phase is not _ROUTING:
            return  # answered meanwhile (timeout), or the client left
        if value is None:
            self.answer(404)
        else:
            self.respond(200, [(b"Content-Type", b"application/octet-stream")], value)

    def respond(self, status: int, fields: h1.Headers, body: bytes) -> None:
        """A whole response of edge's own, through the same four calls as a forwarded one."""
        self.to(_RESPONDING)
        self.status = status
        no_body = self.method == b"HEAD"
        if self.version == "2":
            fields = [(name.lower(), value) for name, value in fields]  # RFC 9113 §8.2.1
        downstream = self.downstream
        downstream.batch_begin()
        downstream.send_head(self, status, phrase(status).encode(), fields, len(body), no_body)
        if body and not no_body:
            self.response_bytes = len(body)
            downstream.send_body(self, body)
        self._complete()
        downstream.batch_end()

    # --- ends ------------------------------------------------------------------------------
    def timed_out(self) -> None:
        """The response timer fired."""
        phase = self.phase
        if phase & _WAITING:
            self.drop_backend()
            self.answer(504)  # the backend has not answered in time (RFC 9110 §15.6.5)
        elif phase is _RESPONDING:
            # Stalled half way (the backend stopped, or the client stopped reading): cut it short.
            self.drop_backend()
            self._cut(UpstreamError("timeout", f"backend {self.backend} stalled mid-response"))

    def client_gone(self) -> None:
        """The client closed the connection or reset the stream: nobody to answer.
        A request already routed is logged with status 499 if it had none (as nginx)."""
        phase = self.phase
        if phase & _ENDED:
            return
        self.drop_backend()
        if phase is _HEAD:
            self.phase = _ABORTED  # never began: nothing to log
            return
        self.to(_ABORTED)
        if phase is not _TUNNEL:
            self.status = self.status or 499  # the client closed the request (nginx's code)
            self._account()

    def drop_backend(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _switch(self, reason: bytes, headers: h1.Headers) -> None:
        """A 101 (RFC 9110 §15.2.2): a byte pipe if the forwarded request asked for
        that protocol; else the backend would be talking a protocol edge never
        agreed to, and the answer is 502."""
        if self.upgrade_to is None or not h1.solicited_upgrade(self.upgrade_to, headers):
            self.drop_backend()
            log.info("backend %s answered 101 to a request that asked for no such upgrade", self.backend)
            self.upstream_error(UpstreamError("protocol", "unsolicited 101"))
            return
        self.to(_TUNNEL)
        self.status = 101
        self.retry_head = b""
        self._account()
        self.downstream.send_head(self, 101, reason, headers, None, False)

    def _complete(self) -> None:
        if not NEXT[self.phase] & _DONE:  # self.to, inline on the hot path
            raise IllegalTransition(self.phase, _DONE)
        self.phase = _DONE
        self._account()
        self.downstream.end(self)

    def _cut(self, error: UpstreamError) -> None:
        """Half a response went out and the rest never will."""
        log.info("upstream %s mid-response: %s", error.kind, error)
        shared = self.downstream.shared
        shared.stats.upstream_error(error.kind)
        count_upstream_error(self.app, shared.app_stats, error.kind)
        self.to(_ABORTED)
        self.keep_alive = False
        self._account()
        self.downstream.abort(self, error)

    def _account(self) -> None:
        """Metrics and the access log (SPEC §5), once per request."""
        downstream = self.downstream
        shared = downstream.shared
        status = self.status
        seconds = time.monotonic() - self.t0
        app = self.app
        app_stats = shared.app_stats
        # The per-app series ([metrics] per_app) are bumped with the process's, one lookup.
        counters = app_stats.of(app.name) if app is not None and app_stats.enabled else None
        shared.stats.request_done(status, seconds, self.version, counters)
        if shared.access_log:
            tls = downstream.tls
            log_access(self, downstream.client_ip, downstream.tls_version, tls.source.value if tls else "",
                       shared.access_format)
