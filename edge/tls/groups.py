"""Key-exchange groups: X25519, P-256 and P-384 only, in TLS 1.2 and 1.3.

Why: OpenSSL 3.0 offers the finite-field groups ffdhe2048..ffdhe8192
(RFC 7919) in TLS 1.3 by default, and a client may pick one. One ffdhe8192
handshake costs ~91 ms of CPU on the event loop against ~0.3 ms for X25519,
so a single client could stall every connection of a worker. P-521 costs
~3x P-384 and no mainstream client needs it. TLS 1.2 key exchange is ECDHE
only (``contexts.TLS12_CIPHERS``), over the same groups.

How: Python 3.11's ``ssl`` has no groups setter (``set_ecdh_curve`` sets a
single NIST curve). OpenSSL's ``SSL_CTX_set1_groups_list`` is a macro for
``SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, list)``; we call it through
ctypes on the ``SSL_CTX *`` that CPython's ``PySSLContext`` holds right after
its object header (``Modules/_ssl.c``: ``PyObject_HEAD; SSL_CTX *ctx;``). The
pointer is checked (its options must read back as ``ctx.options``) before it
is used. An OPENSSL_CONF file would do it too, but only if set before OpenSSL
initialises, for the whole process, and it replaces the system's file.
"""

from __future__ import annotations

import _ssl
import ctypes
import logging
import ssl

log = logging.getLogger(__name__)

GROUPS = "X25519:P-256:P-384"  # in order of preference (RFC 8446 §4.2.7)
_SSL_CTRL_SET_GROUPS_LIST = 92  # include/openssl/ssl.h


class _OpenSSL:
    """The libssl that CPython's ``_ssl`` module is linked against (dlsym on
    ``_ssl`` searches its dependencies, so this is the same library)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(_ssl.__file__)
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_options.restype = ctypes.c_uint64


_lib: _OpenSSL | None = None


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: _OpenSSL) -> int:
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer or lib.get_options(pointer) != int(ctx.options):
        raise RuntimeError("unexpected layout of ssl.SSLContext")
    return pointer


def restrict_groups(ctx: ssl.SSLContext) -> None:
    """Offer only ``GROUPS`` on ``ctx`` (key shares, TLS 1.2 ECDHE curves)."""
    global _lib
    try:
        if _lib is None:
            _lib = _OpenSSL()
        if _lib.ctrl(_ssl_ctx_pointer(ctx, _lib), _SSL_CTRL_SET_GROUPS_LIST, 0,
                     ctypes.c_char_p(GROUPS.encode())) != 1:
            raise RuntimeError(f"OpenSSL refused the groups {GROUPS}")
    except (OSError, AttributeError, RuntimeError, ValueError) as exc:
        # Still never ffdhe: one curve (P-256) through the stdlib setter, which
        # in OpenSSL 3.0 replaces the whole group list, TLS 1.3 included.
        log.warning("cannot set TLS groups to %s (%s): offering P-256 only", GROUPS, exc)
        ctx.set_ecdh_curve("prime256v1")
