"""Which certificate a handshake gets: the rules of SPEC §2, in order.

Hash lookups only: the cost does not depend on how many names the index holds.
"""

from __future__ import annotations

import enum
import time
from typing import NamedTuple

from edge import names
from edge.config import Config
from edge.records import CertMeta, CertSource
from edge.store.base import cert_key
from edge.store.index import Index


class Source(enum.Enum):
    """Why a handshake got its certificate (a metrics label): a stored one by
    its source, or one of the configured ones."""

    CUSTOM = CertSource.CUSTOM.value
    ACME = CertSource.ACME.value
    WILDCARD = "custom-wildcard"
    PLATFORM = "platform"
    DEFAULT = "default"


class BundleKey(NamedTuple):
    """One bundle as the TLS context cache names it: its record (domain,
    source, key type) and the digest of the stored value the index accepted.

    Record values as they are, compared as a tuple: nothing is formatted per
    handshake, and the loader parses nothing back (``store_key`` is made on a
    cache miss only)."""

    domain: str
    source: str
    key_type: str
    digest: int

    @property
    def store_key(self) -> str:
        return cert_key(self.domain, self.source, self.key_type)


ContextKey = tuple[BundleKey, ...]


class Choice(NamedTuple):
    """A selected certificate: the bundles to serve (one per key type) and why.

    ``cache_key`` identifies the TLS context for exactly these bundles; it
    changes when any bundle is replaced, so a stale context is never served.
    (A NamedTuple: made on every handshake, and cheaper to make than a frozen
    dataclass.)
    """

    source: Source
    bundles: tuple[CertMeta, ...] = ()
    cache_key: ContextKey = ()


PLATFORM = Choice(Source.PLATFORM)
DEFAULT = Choice(Source.DEFAULT)


def _choice(source: Source, bundles: tuple[CertMeta, ...]) -> Choice:
    return Choice(source, bundles, tuple([BundleKey(b.domain, b.source, b.key_type, b.digest) for b in bundles]))


class Selector:
    def __init__(self, index: Index, platform_domain: str, strict_sni: bool, default_is_platform: bool = True) -> None:
        self.index = index
        self.platform_domain = platform_domain
        self.strict_sni = strict_sni
        self.default_is_platform = default_is_platform

    def reconfigure(self, config: Config) -> None:
        """A reload: ``strict_sni`` applies to the next handshakes (the platform
        domain needs a restart)."""
        self.strict_sni = config.platform.strict_sni

    def same_certificate(self, a: Choice | None, b: Choice | None) -> bool:
        """Do two choices serve the same certificate?"""
        if a is None or b is None:
            return a is b
        if self.default_is_platform:
            a = PLATFORM if a is DEFAULT else a
            b = PLATFORM if b is DEFAULT else b
        return a.source is b.source and a.cache_key == b.cache_key

    def select(self, name: str | None, now: float | None = None) -> Choice | None:
        """The certificate for canonical host ``name`` (None: no or invalid SNI).

        Returns None when the handshake must be refused (strict SNI).
        """
        if name is None:
            return None if self.strict_sni else DEFAULT
        when = time.time() if now is None else now
        certs = self.index.certs
        domains = self.index.domains
        held = certs.get(name)
        # Only certificates of attached domains are served: one whose domain
        # entry is gone (a removal killed midway, a hand edit) is listed
        # nowhere, so it must not be served either (`edge check` names it).
        if held is not None and name in domains:
            # 1. a valid custom certificate of that exact domain
            if bundles := held.valid(CertSource.CUSTOM, when):
                return _choice(Source.CUSTOM, bundles)
            # 2. a valid acme certificate of that exact domain
            if bundles := held.valid(CertSource.ACME, when):
                return _choice(Source.ACME, bundles)
        # 3. a valid custom certificate of the wildcard one label up
        parent = names.wildcard_parent(name)
        if (parent is not None and (wild := certs.get(parent)) is not None and parent in domains
                and (bundles := wild.valid(CertSource.CUSTOM, when))):
            return _choice(Source.WILDCARD, bundles)
        # 4. the platform certificate for the platform domain and one label under
        platform = self.platform_domain
        if name == platform or names.is_one_label_under(name, platform):
            return PLATFORM
        # 5. the default certificate, or refusal with strict SNI
        return None if self.strict_sni else DEFAULT
