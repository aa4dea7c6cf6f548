"""TLS contexts: the listener's settings, per-certificate contexts built on
demand in a thread pool, and the bounded cache that holds the hot ones.

``SSLContext.load_cert_chain`` costs ~1 ms and ~20 KiB, so at a million names
contexts are built only when a handshake needs one, off the event loop, and
kept in an LRU. ``load_cert_chain`` wants a path: the PEM goes through a
memfd so private keys are never written to disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from edge.config import Config
from edge.tls.groups import restrict_groups
from edge.tls.selector import ContextKey

log = logging.getLogger(__name__)

# Mozilla "intermediate" TLS 1.2 suites (forward secret AEAD only, ECDHE: no
# finite-field DHE, whose cost a client could choose, see groups.py); TLS 1.3
# suites are all modern and left at OpenSSL's defaults.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
# What the TLS listeners offer by ALPN (RFC 7301), best first. ``[proxy] http2``
# decides whether h2 is in it (``offer_http2``, called at start before any
# context is built; a context already cached keeps what it was built with).
ALPN = ["h2", "http/1.1"]


def offer_http2(enabled: bool) -> None:
    ALPN[:] = ["h2", "http/1.1"] if enabled else ["http/1.1"]


class ContextBuildError(RuntimeError):
    """A stored bundle that OpenSSL refuses (key/cert mismatch edited by hand, ...)."""


def base_context(min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context with edge's security settings and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.set_ciphers(TLS12_CIPHERS)
    restrict_groups(ctx)  # X25519, P-256, P-384: no client-chosen ffdhe8192 (groups.py)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Clients pick among our suites (all strong): they know whether they have AES hardware.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(ALPN)
    # One TLS 1.3 session ticket after a full handshake, not OpenSSL's two
    # (RFC 8446 §4.6.1 leaves the number to the server; Go's crypto/tls also
    # sends one). A ticket costs ~5% of a full ECDSA handshake's CPU, and a
    # resumption saves no round trip here (no 0-RTT), only server CPU: every
    # resumed connection gets a fresh ticket (OpenSSL sends one after a
    # resumption whatever this says), so a client reconnecting one connection
    # at a time always holds one. Only a client opening two connections at
    # once before either got its ticket resumes one of them, not both.
    ctx.num_tickets = 1
    return ctx


def load_pem(ctx: ssl.SSLContext, pem: bytes) -> None:
    """Add one certificate chain + key (a single PEM) to ``ctx`` without touching disk.

    Calling this for an RSA and then an ECDSA bundle keeps both: OpenSSL
    serves ECDSA to clients whose signature algorithms allow it.
    """
    fd = os.memfd_create("edge-bundle", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise ContextBuildError(f"OpenSSL refused the bundle: {exc.reason or exc}") from None
    finally:
        os.close(fd)


def build_context(pems: Sequence[bytes], min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A context serving ``pems`` (one per key type). Blocking: call from a thread."""
    ctx = base_context(min_version)
    for pem in pems:
        load_pem(ctx, pem)
    return ctx


class ContextCache:
    """A bounded LRU of built contexts with single-flight building.

    Event-loop thread only. ``get_nowait`` is the fast path; ``get`` builds a
    missing one with ``loader`` (which reads the store and calls
    ``build_context`` in a thread). Concurrent ``get`` calls for one key share
    one build, as certmagic does for concurrent handshakes on a cold name.
    """

    def __init__(
        self,
        size: int,
        loader: Callable[[ContextKey], Awaitable[ssl.SSLContext]],
        min_version: str = "TLSv1.2",
    ) -> None:
        self.size = size
        self.min_version = min_version  # what the loader builds with: the cache key does not name it
        self._loader = loader
        self._entries: OrderedDict[ContextKey, ssl.SSLContext] = OrderedDict()
        self._building: dict[ContextKey, asyncio.Future[ssl.SSLContext]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_nowait(self, key: ContextKey) -> ssl.SSLContext | None:
        ctx = self._entries.get(key)
        if ctx is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return ctx

    async def get(self, key: ContextKey) -> ssl.SSLContext:
        ctx = self.get_nowait(key)
        if ctx is not None:
            return ctx
        pending = self._building.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[ssl.SSLContext] = asyncio.get_running_loop().create_future()
        self._building[key] = future
        try:
            ctx = await self._loader(key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters may be none
            raise
        finally:
            del self._building[key]
        self._entries[key] = ctx
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        future.set_result(ctx)
        return ctx

    def reconfigure(self, config: Config) -> None:
        """A reload: the new size holds from the next insertion on."""
        self.size = config.tls.context_cache_size
        if config.tls.min_version != self.min_version:
            # Built contexts carry the version they were built with and their
            # cache key does not name it: drop them, the next handshakes rebuild.
            self._entries.clear()
            self.min_version = config.tls.min_version

    def counters(self) -> dict[str, Any]:
        """A snapshot for edge.metrics (summed across workers key by key)."""
        return {"cache_size": len(self._entries), "cache_hits": self.hits, "cache_misses": self.misses}
