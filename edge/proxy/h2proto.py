"""The client side of an HTTP/2 connection: the asyncio adapter of ``edge.h2``,
and the ``Downstream`` of its streams' requests.

Bytes read go to the sans-I/O connection; its events open, feed and reset
streams, each a ``Request`` (``edge.proxy.request``) driving this connection
with its stream id; what the connection has to send is written once per
read, or once per backend read (batched like HTTP/1.1's writes). One timer
per connection: idle (no stream open) ends the connection with GOAWAY and
the last stream id (RFC 9113 §6.8), and stream deadlines (backend response,
stalled readers) are checked on the same tick.

Back-pressure per stream: response DATA waits for the client's windows in
the connection's per-stream queue; past ``STREAM_HIGH_WATER`` queued bytes
the stream's backend is paused, and resumed when the queue drains. A client
that does not read one stream holds back that stream's backend only.

``AlpnSwitch`` picks this protocol or the HTTP/1.1 one once the handshake
has chosen the ALPN protocol (RFC 7301).
"""

from __future__ import annotations

import asyncio
import logging

from edge.h2 import H2Connection, H2Settings
from edge.h2 import events as ev
from edge.h2.errors import ErrorCode
from edge.proxy import h1
from edge.proxy.downstream import ClientConnection, bodiless
from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.proxy.h2stream import STREAM_HIGH_WATER, open_request, refused, response_fields
from edge.proxy.protocol import HttpProxyProtocol
from edge.proxy.request import Request
from edge.proxy.upstream import UpstreamError
from edge.tls.acceptor import TlsInfo

log = logging.getLogger("edge.proxy.h2")

_TICK = 1.0  # seconds between checks of stream deadlines while streams are open


def h2_settings(shared: ProxyContext) -> H2Settings:
    config = shared.config
    return H2Settings(
        max_concurrent_streams=config.max_concurrent_streams,
        max_header_list_size=config.max_header_bytes,
        hard_header_list_size=4 * config.max_header_bytes,
    )


class H2ProxyProtocol(ClientConnection):
    def __init__(self, shared: ProxyContext, listener: ListenerInfo, tls: TlsInfo | None) -> None:
        super().__init__(shared, listener, tls)
        self.h2 = H2Connection(h2_settings(shared))
        self.exchanges: dict[int, Request] = {}  # the open streams' requests, by stream id
        self._batch = 0
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._flush_soon = False

    # --- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.h2.initiate()
        if self.shared.draining:
            self.h2.close()
        self.flush_now()
        self._idle_since = self._loop.time()
        self._schedule(self._idle_since + self.config.request_head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        super().connection_lost(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        exchanges, self.exchanges = self.exchanges, {}
        for req in exchanges.values():
            req.client_gone()  # nobody to answer
        self.transport = None

    def data_received(self, data: bytes | memoryview) -> None:
        self._batch += 1
        try:
            for event in self.h2.receive_data(data):
                self._event(event)
        finally:
            self._batch -= 1
        self.flush()

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        # The client's socket is full: every stream's backend waits (large
        # windows do not let the transport buffer grow), and the client is
        # not read either (no more PING answers piling up).
        self.write_paused = True
        for req in self.exchanges.values():
            req.hold()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for req in list(self.exchanges.values()):
            self._window_opened(req)
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()

    # --- events ------------------------------------------------------------------------
    def _event(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            self._data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, ev.RequestReceived):
            req = open_request(self, event.stream_id, event.request, event.end_stream)
            self.exchanges[event.stream_id] = req
            req.start(refused(self, event.request))
        elif isinstance(event, ev.TrailersReceived):
            ended = self.exchanges.get(event.stream_id)
            if ended is not None:
                ended.request_end(list(event.fields))
        elif isinstance(event, ev.WindowOpened):
            for sid in event.stream_ids:
                waiting = self.exchanges.get(sid)
                if waiting is not None:
                    self._window_opened(waiting)
        elif isinstance(event, ev.StreamReset):
            reset = self.exchanges.pop(event.stream_id, None)
            if reset is not None:
                reset.client_gone()
                self._stream_done()
        elif isinstance(event, ev.ConnectionTerminated):
            if not event.remote:
                log.debug("HTTP/2 connection error from %s: %s", self.client_ip.decode(), event.reason)
                self._close()
            elif not self.exchanges:
                self._close()

    def _data(self, sid: int, data: bytes, end_stream: bool) -> None:
        """Request DATA is given back to the client's window (RFC 9113 §6.9) once
        edge took it, unless the request holds it (``pause``): a slow backend
        slows that upload only. A body nobody wants is given back at once."""
        req = self.exchanges.get(sid)
        n = len(data)
        if req is None or (n and not req.request_body(data)):
            self.h2.ack_data(sid, n)
        elif n:
            req.unacked += n
            if not req.body_held:
                self.h2.ack_data(sid, req.unacked)
                req.unacked = 0
        if end_stream and req is not None:
            req.request_end()

    def _window_opened(self, req: Request) -> None:
        """The client read some of this stream: resume its backend below the mark."""
        req.deadline = self._loop.time() + self.config.response_timeout
        if req.backend_paused and not self.write_paused and self.h2.buffered(req.sid) <= STREAM_HIGH_WATER // 2:
            req.release()

    # --- Downstream: what a stream's request calls ------------------------------------------
    def send_head(self, req: Request, status: int, reason: bytes, headers: h1.Headers,
                  length: int | None, no_body: bool) -> None:
        if req.sid not in self.h2.streams:
            return
        if status < 200:
            # Interim HEADERS (RFC 9113 §8.1); a 101 has no meaning in HTTP/2 and never comes here.
            self.h2.send_headers(req.sid, response_fields(status, headers, None))
            return
        self.h2.send_headers(req.sid, response_fields(status, headers, length), end_stream=no_body)

    def send_body(self, req: Request, data: bytes) -> None:
        req.deadline = self._loop.time() + self.config.response_timeout
        h2 = self.h2
        if req.sid not in h2.streams:
            return  # the stream ended meanwhile (a stream error of the client's)
        h2.send_data(req.sid, data)
        if self.write_paused or h2.buffered(req.sid) > STREAM_HIGH_WATER:
            req.hold()

    def end(self, req: Request) -> None:
        if not bodiless(req.method, req.status) and req.sid in self.h2.streams:
            self.h2.send_data(req.sid, b"", end_stream=True)
        self._forget(req)

    def abort(self, req: Request, error: UpstreamError) -> None:
        # A stalled stream is cancelled; a broken backend is an internal error (RFC 9113 §7).
        self.h2.reset_stream(req.sid, ErrorCode.CANCEL if error.kind == "timeout" else ErrorCode.INTERNAL_ERROR)
        self._forget(req)

    def _forget(self, req: Request) -> None:
        if req.unacked:
            # Held back for a backend that is gone: the rest of the body is read
            # and dropped, so the client must be able to send it.
            self.h2.ack_data(req.sid, req.unacked)
            req.unacked = 0
        if self.exchanges.pop(req.sid, None) is not None:
            self._stream_done()

    def pause(self, req: Request) -> None:
        pass  # req.body_held: request DATA is no longer given back, the client waits (see _data)

    def resume(self, req: Request) -> None:
        if req.unacked:
            self.h2.ack_data(req.sid, req.unacked)
            req.unacked = 0
            self.flush()

    def waiting(self, req: Request) -> None:
        req.deadline = self._loop.time() + self.config.response_timeout  # checked by the tick
        self._schedule(self._loop.time() + _TICK)
        self.flush()

    def batch_begin(self) -> None:
        self._batch += 1

    def batch_end(self) -> None:
        self._batch -= 1
        self.flush()

    # --- writes ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what the connection has to send, once per turn of the loop: the
        answers of several streams (each from its own backend read) go out as
        one write, one TLS record."""
        if self._batch or self._flush_soon:
            return
        self._flush_soon = True
        self._loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_soon = False
        out = self.h2.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _stream_done(self) -> None:
        self.served += 1
        if not self.exchanges:
            self._idle_since = self._loop.time()
            if self.shared.draining or self.h2.state.name in ("DRAINING", "CLOSED"):
                self._close()
        self.flush()

    # --- time, shutdown ---------------------------------------------------------------------
    def _tick(self) -> None:
        """Streams in flight: their deadlines, every second. None: sleep until the
        idle deadline (an idle connection costs no timer callback per second)."""
        self._timer = None
        if self._closing or self.transport is None:
            return
        now = self._loop.time()
        if self.exchanges:
            for req in [r for r in self.exchanges.values() if r.deadline and now >= r.deadline]:
                req.timed_out()
            self.flush()
            self._schedule(now + _TICK)
            return
        idle_for = self.config.idle_timeout if self.served else self.config.request_head_timeout
        if now - self._idle_since >= idle_for:
            # Idle (or a new connection that never asked anything).
            self.h2.close()  # GOAWAY with the last stream id (RFC 9113 §6.8), then close
            self._close()
            return
        self._schedule(self._idle_since + idle_for)

    def _schedule(self, when: float) -> None:
        """The next tick at ``when``, or sooner if one is already due sooner."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._loop.call_at(when, self._tick)

    def drain(self) -> None:
        """Shutdown: GOAWAY now; close once the streams in flight are done."""
        self.h2.close()
        self.flush_now()
        if not self.exchanges:
            self._close()

    def _close(self) -> None:
        self._closing = True
        self._batch = 0
        self.flush_now()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class AlpnSwitch(asyncio.Protocol):
    """Becomes HTTP/2 or HTTP/1.1 once the handshake chose by ALPN."""

    def __init__(self, shared: ProxyContext, listener: ListenerInfo, tls: TlsInfo | None) -> None:
        self.shared = shared
        self.listener = listener
        self.tls = tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        chosen = sslobj.selected_alpn_protocol() if sslobj is not None else None
        protocol: asyncio.BaseProtocol
        if chosen == "h2":  # offered only with [proxy] http2 (read at start: contexts carry it)
            protocol = H2ProxyProtocol(self.shared, self.listener, self.tls)
        else:
            protocol = HttpProxyProtocol(self.shared, self.listener, self.tls)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


def tls_protocol(shared: ProxyContext, listener: ListenerInfo, http2: bool, tls: TlsInfo) -> asyncio.BaseProtocol:
    """The protocol of a new TLS connection. ALPN picks only a protocol the client
    offered (RFC 7301 §3.2): without h2 in its ClientHello, or with ``[proxy] http2``
    off (then never offered), it is HTTP/1.1 from the start, with no switch made and
    dropped per connection."""
    if http2 and b"h2" in tls.alpn:
        return AlpnSwitch(shared, listener, tls)
    return HttpProxyProtocol(shared, listener, tls)
