"""The client side of an HTTP/2 connection: the asyncio adapter of ``edge.h2``.

Bytes read go to the sans-I/O connection; its events start, feed, reset and
resume streams (``H2Exchange``); what it has to send is written once per
read, or once per backend read (batched like HTTP/1.1's writes). One timer
per connection: idle (no stream open) ends the connection with GOAWAY and
the last stream id (RFC 9113 §6.8), and stream deadlines (backend response,
stalled readers) are checked on the same tick.

``AlpnSwitch`` picks this protocol or the HTTP/1.1 one once the handshake
has chosen the ALPN protocol (RFC 7301).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from edge.h2 import H2Connection, H2Settings
from edge.h2 import events as ev
from edge.proxy.exchange import ListenerInfo, ProxyContext
from edge.proxy.h2stream import H2Exchange
from edge.proxy.protocol import WRITE_HIGH_WATER, HttpProxyProtocol
from edge.tls.acceptor import TlsInfo

log = logging.getLogger("edge.proxy.h2")

_READ_BUFFER = memoryview(bytearray(64 * 1024))  # shared, as HttpProxyProtocol's (see there)
_TICK = 1.0  # seconds between checks of stream deadlines while streams are open


def h2_settings(shared: ProxyContext) -> H2Settings:
    config = shared.config
    return H2Settings(
        max_concurrent_streams=config.max_concurrent_streams,
        max_header_list_size=config.max_header_bytes,
        hard_header_list_size=4 * config.max_header_bytes,
    )


class H2ProxyProtocol(asyncio.BufferedProtocol):
    def __init__(self, shared: ProxyContext, listener: ListenerInfo, tls: TlsInfo | None) -> None:
        self.shared = shared
        self.config = shared.config
        self.listener = listener
        self.tls = tls
        self.peer = tls.peer if tls is not None else None  # the client, when a control named it (edge.tls.gate)
        self.h2 = H2Connection(h2_settings(shared))
        self.exchanges: dict[int, H2Exchange] = {}
        self.transport: asyncio.Transport | None = None
        self.client_ip = b""
        self.tls_version = ""
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in connection_made
        self._batch = 0
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._served = 0
        self.write_paused = False
        self._flush_soon = False

    # --- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        if self.peer is not None:
            self.client_ip = self.peer.ip
        else:
            peername = transport.get_extra_info("peername")
            self.client_ip = str(peername[0]).encode() if peername else b""
        sslobj = transport.get_extra_info("ssl_object")
        self.tls_version = (sslobj.version() or "") if sslobj is not None else ""
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.shared.connections.add(self)
        self.h2.initiate()
        if self.shared.draining:
            self.h2.close()
        self.flush_now()
        self._idle_since = self._loop.time()
        self._schedule(self._idle_since + self.config.request_head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.shared.connections.discard(self)
        if self.peer is not None and self.peer.slot is not None:
            self.peer.slot.release()  # [limits]: the connection's place frees now
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for exchange in list(self.exchanges.values()):
            exchange.reset()  # the client is gone: nobody to answer
        self.exchanges.clear()
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_BUFFER[:nbytes])

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
        for exchange in self.exchanges.values():
            exchange.hold()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for exchange in list(self.exchanges.values()):
            exchange.window_opened()
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()

    # --- events ------------------------------------------------------------------------
    def _event(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.request_body(event.data, event.end_stream)
            else:
                self.h2.ack_data(event.stream_id, len(event.data))
        elif isinstance(event, ev.RequestReceived):
            exchange = H2Exchange(self, event.stream_id, event.request, event.end_stream)
            self.exchanges[event.stream_id] = exchange
            exchange.start()
        elif isinstance(event, ev.TrailersReceived):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.request_trailers(event.fields)
        elif isinstance(event, ev.WindowOpened):
            for sid in event.stream_ids:
                exchange = self.exchanges.get(sid)
                if exchange is not None:
                    exchange.window_opened()
        elif isinstance(event, ev.StreamReset):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.reset()
        elif isinstance(event, ev.ConnectionTerminated):
            if not event.remote:
                log.debug("HTTP/2 connection error from %s: %s", self.client_ip.decode(), event.reason)
                self._close()
            elif not self.exchanges:
                self._close()

    # --- what streams call ----------------------------------------------------------------
    def now(self) -> float:
        return self._loop.time()

    def watch(self) -> None:
        """A stream has a deadline now: ticks every second from here on."""
        self._schedule(self._loop.time() + _TICK)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        tasks = self.shared.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def batch_begin(self) -> None:
        self._batch += 1

    def batch_end(self) -> None:
        self._batch -= 1
        self.flush()

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

    def exchange_done(self, exchange: H2Exchange) -> None:
        self._served += 1
        if self.exchanges.pop(exchange.sid, None) is not None and not self.exchanges:
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
            for exchange in [e for e in self.exchanges.values() if e.deadline and now >= e.deadline]:
                exchange.timed_out()
            self.flush()
            self._schedule(now + _TICK)
            return
        idle_for = self.config.idle_timeout if self._served else self.config.request_head_timeout
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

