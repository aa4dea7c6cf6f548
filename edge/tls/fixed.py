"""The always-loaded TLS contexts: the platform certificate and the default one.

Loaded from the configured files at start (a broken one stops start-up with
its error) and again on SIGHUP, into the live contexts.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from edge.config import Config
from edge.errors import StartupError
from edge.tls import contexts, devcert

log = logging.getLogger(__name__)


def load_fixed_context(cert: str, key: str, min_version: str) -> ssl.SSLContext:
    ctx = contexts.base_context(min_version)
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise StartupError(f"{exc.filename}: no such file; check [platform] cert/key in the config") from None
    except ssl.SSLError as exc:
        raise StartupError(f"{cert}: OpenSSL refused the certificate or key: {exc.reason or exc}") from None
    return ctx


@dataclass(frozen=True)
class FixedContexts:
    """The always-loaded contexts. Built before workers fork, so every worker's
    listener context shares one set of TLS session-ticket keys."""

    platform: ssl.SSLContext
    default: ssl.SSLContext


def reload_certificates(cfg: Config, fixed: FixedContexts) -> None:
    """Load the configured platform/default certificates into the live contexts.

    Checked on a scratch context first: a broken file changes nothing.
    """
    pairs = [(fixed.platform, cfg.platform.cert, cfg.platform.key)]
    if cfg.tls.default_cert and cfg.tls.default_key and fixed.default is not fixed.platform:
        pairs.append((fixed.default, cfg.tls.default_cert, cfg.tls.default_key))
    for _ctx, cert, key in pairs:
        load_fixed_context(str(cert), str(key), cfg.tls.min_version)  # raises StartupError when broken
    for ctx, cert, key in pairs:
        ctx.load_cert_chain(str(cert), str(key))
    # The live contexts take the new minimum version too: a SIGHUP that raises
    # it must not leave the platform and default names on the old one.
    version = contexts.base_context(cfg.tls.min_version).minimum_version
    for ctx in {id(c): c for c in (fixed.platform, fixed.default)}.values():
        ctx.minimum_version = version


def load_fixed_contexts(cfg: Config) -> FixedContexts:
    contexts.offer_http2(cfg.proxy.http2)  # before any context is built (workers inherit it)
    platform = cfg.platform
    if platform.dev_certificates:
        message = devcert.ensure_dev_certificates(platform.domain, platform.cert, platform.key)
        if message:
            log.warning("%s", message)
    min_version = cfg.tls.min_version
    platform_ctx = load_fixed_context(str(platform.cert), str(platform.key), min_version)
    if cfg.tls.default_cert and cfg.tls.default_key:
        default_ctx = load_fixed_context(str(cfg.tls.default_cert), str(cfg.tls.default_key), min_version)
    else:
        # The platform certificate is the default: one context serves both.
        default_ctx = platform_ctx
    return FixedContexts(platform_ctx, default_ctx)
