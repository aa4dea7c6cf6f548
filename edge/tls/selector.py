"""Which certificate a handshake gets: the rules of SPEC §2, in order.

Hash lookups only: the cost does not depend on how many names the index holds.
One lookup per name asked (its domain entry and certificates together), and
the choice among a name's certificates is remembered until one of them
starts or ends its validity or the name's record changes.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import NamedTuple

from edge import names
from edge.config import Config
from edge.records import CertMeta, CertSource, DomainCerts
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


# A name's record: (its app, None when the domain is not attached; its certificates).
Record = tuple[str | None, DomainCerts]
# Rules 1 and 2 for an exact name; rule 3 for the wildcard one label up.
_EXACT = ((CertSource.CUSTOM, Source.CUSTOM), (CertSource.ACME, Source.ACME))
_WILDCARD = ((CertSource.CUSTOM, Source.WILDCARD),)
_REMEMBERED = 4096  # names whose choice is kept (cleared when full: each is worked out again)


def _lookup_of(index: Index) -> Callable[[str], Record | None]:
    """The index's one-lookup read of a name (``SharedIndex.record``), or the
    same made of the in-memory index's two dictionaries."""
    record = getattr(index, "record", None)
    if record is not None:
        return record  # type: ignore[no-any-return]
    certs, domains = index.certs, index.domains

    def lookup(name: str) -> Record | None:
        held = certs.get(name)
        return None if held is None else (domains.get(name), held)

    return lookup


def _decide(held: DomainCerts, when: float, rules: tuple[tuple[str, Source], ...]
            ) -> tuple[Choice | None, float, float]:
    """The choice among ``held`` at ``when``, and the times between which it stays the same."""
    choice = None
    for cert_source, source in rules:
        if bundles := held.valid(cert_source, when):
            choice = _choice(source, bundles)
            break
    since, until = float("-inf"), float("inf")
    for meta in held:  # validity changes only at these instants (CertMeta.valid_at)
        for instant in (meta.not_before, meta.not_after):
            if instant <= when:
                since = max(since, instant)
            else:
                until = min(until, instant)
    return choice, since, until


class Selector:
    def __init__(self, index: Index, platform_domain: str, strict_sni: bool, default_is_platform: bool = True) -> None:
        self.index = index
        self.platform_domain = platform_domain
        self.strict_sni = strict_sni
        self.default_is_platform = default_is_platform
        self._lookup = _lookup_of(index)
        # name -> (the certificates it was worked out from, valid from, until, choice).
        # Compared by identity: the index hands out the same object until the record changes.
        self._remembered: dict[str, tuple[DomainCerts, float, float, Choice | None]] = {}

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
        # Only certificates of attached domains are served: one whose domain
        # entry is gone (a removal killed midway, a hand edit) is listed
        # nowhere, so it must not be served either (`edge check` names it).
        record = self._lookup(name)
        # 1. a valid custom certificate of that exact domain
        # 2. a valid acme certificate of that exact domain
        if (record is not None and record[0] is not None and record[1]
                and (choice := self._among(name, record[1], when, _EXACT)) is not None):
            return choice
        # 3. a valid custom certificate of the wildcard one label up
        parent = names.wildcard_parent(name)
        if (parent is not None and (wild := self._lookup(parent)) is not None and wild[0] is not None and wild[1]
                and (choice := self._among(parent, wild[1], when, _WILDCARD)) is not None):
            return choice
        # 4. the platform certificate for the platform domain and one label under
        platform = self.platform_domain
        if name == platform or names.is_one_label_under(name, platform):
            return PLATFORM
        # 5. the default certificate, or refusal with strict SNI
        return None if self.strict_sni else DEFAULT

    def _among(self, key: str, held: DomainCerts, when: float, rules: tuple[tuple[str, Source], ...]
               ) -> Choice | None:
        """``rules`` applied to ``held`` (the certificates of ``key``) at ``when``, remembered."""
        kept = self._remembered.get(key)
        if kept is not None and kept[0] is held and kept[1] <= when < kept[2]:
            return kept[3]
        choice, since, until = _decide(held, when, rules)
        if len(self._remembered) >= _REMEMBERED:
            self._remembered.clear()
        self._remembered[key] = (held, since, until, choice)
        return choice
