"""The in-memory index every edge process keeps of the store.

A small entry per name: apps, which app each domain belongs to, and for each
domain the *header* of each certificate bundle (source, key type, validity,
fingerprint). No certificate is parsed here and no PEM is kept: the TLS
layer reads the bundle from the store when it first builds its context.

Values that do not parse (someone edited a file by hand) are reported and
skipped; the previous good entry for that key stays in service, also across
a full reload (``replace_with``). After a restart no earlier version is
known: the entry is missing from the index and ``errors`` names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass

from edge.records import KEY_TYPES, SOURCES
from edge.store.appsettings import parse_error_pages, parse_hsts
from edge.store.base import APPS, CERTS, DOMAINS, Event, EventKind, cert_key, parse_cert_key

log = logging.getLogger(__name__)

_INTERNED = {s: s for s in (*SOURCES, *KEY_TYPES)}


class EntryError(ValueError):
    """A store value that does not have the expected shape."""


@dataclass(frozen=True, slots=True)
class App:
    name: str
    backends: tuple[str, ...]
    force_https: bool = True
    # Per-app settings (edge.store.appsettings), prepared for the data path:
    hsts: bytes = b""  # the Strict-Transport-Security value for HTTPS answers; b"": none
    maintenance: bool = False  # answer 503 with the maintenance page, the backend untouched
    error_pages: tuple[tuple[int, bytes], ...] = ()  # (status, HTML) replacing edge's own bodies

    def error_page(self, status: int) -> bytes | None:
        for code, html in self.error_pages:
            if code == status:
                return html
        return None


@dataclass(frozen=True, slots=True)
class CertMeta:
    """The header of one stored bundle; enough to choose it without parsing it.

    Kept small (a million of these is the index at scale): the store key is
    derived, and the short strings are interned.
    """

    domain: str
    source: str
    key_type: str
    not_before: float
    not_after: float
    fingerprint: str
    # The digest of the whole stored value: chain, key, header. TLS contexts
    # are cached under it, so anything that changes what is served (a chain
    # completed for the same leaf, a new key) names a new context.
    digest: int = 0  # 64 bits: an int is half the memory of its hex string, at a million names

    @property
    def store_key(self) -> str:
        return cert_key(self.domain, self.source, self.key_type)

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after


class DomainCerts(tuple):
    """The bundles held for one domain (at most one per source and key type),
    ordered by source then key type. A tuple: no per-name dictionaries."""

    __slots__ = ()

    def valid(self, source: str, now: float) -> tuple[CertMeta, ...]:
        return tuple(m for m in self if m.source == source and m.valid_at(now))

    def of(self, source: str) -> tuple[CertMeta, ...]:
        return tuple(m for m in self if m.source == source)

    def replaced(self, meta: CertMeta) -> DomainCerts:
        kept = [m for m in self if (m.source, m.key_type) != (meta.source, meta.key_type)]
        return DomainCerts(sorted([*kept, meta], key=lambda m: (m.source, m.key_type)))

    def without(self, source: str, key_type: str) -> DomainCerts:
        return DomainCerts(m for m in self if (m.source, m.key_type) != (source, key_type))


def bundle_header(meta: CertMeta | dict[str, object]) -> bytes:
    """The JSON line that starts a stored bundle."""
    if isinstance(meta, CertMeta):
        meta = {
            "domain": meta.domain,
            "source": meta.source,
            "key_type": meta.key_type,
            "not_before": meta.not_before,
            "not_after": meta.not_after,
            "fingerprint": meta.fingerprint,
        }
    return json.dumps(meta, sort_keys=True).encode() + b"\n"


def entry_digest(value: bytes) -> int:
    """What identifies one stored version of an entry (~4 µs for a bundle)."""
    return int.from_bytes(hashlib.sha256(value).digest()[:8])


def split_bundle(value: bytes) -> tuple[bytes, bytes]:
    """(header line, PEM) of a stored bundle."""
    header, sep, pem = value.partition(b"\n")
    if not sep:
        raise EntryError("no header line before the PEM")
    return header, pem


def parse_app(name: str, value: bytes) -> App:
    try:
        data = json.loads(value)
        backends = tuple(str(b) for b in data["backends"])
        force_https = bool(data.get("force_https", True))
        hsts = parse_hsts(data.get("hsts"))
        pages = parse_error_pages(data.get("error_pages"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EntryError(f"not an app record ({exc.__class__.__name__}: {exc})") from None
    return App(name, backends, force_https, hsts.field_value() if hsts else b"", bool(data.get("maintenance")),
               pages)


def parse_domain(value: bytes) -> str:
    try:
        app = json.loads(value)["app"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EntryError(f"not a domain record ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(app, str):
        raise EntryError("'app' is not a string")
    return sys.intern(app)  # one string per app, however many domains it has


def parse_cert(key: str, value: bytes) -> CertMeta:
    parts = parse_cert_key(key)
    if parts is None:
        raise EntryError("not a certificate key")
    domain, source, key_type = parts
    if source not in SOURCES or key_type not in KEY_TYPES:
        raise EntryError(f"unknown source or key type {source}-{key_type}")
    header, pem = split_bundle(value)
    if b"-----BEGIN CERTIFICATE-----" not in pem or b"PRIVATE KEY-----" not in pem:
        raise EntryError("the PEM certificate or key is missing")
    try:
        data = json.loads(header)
        return CertMeta(
            domain=sys.intern(domain),
            source=_INTERNED[source],
            key_type=_INTERNED[key_type],
            not_before=float(data["not_before"]),
            not_after=float(data["not_after"]),
            fingerprint=str(data["fingerprint"]),
            digest=entry_digest(value),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise EntryError(f"bad header line ({exc.__class__.__name__}: {exc})") from None


_EMPTY = DomainCerts()


def name_record(index: Index, domain: str) -> bytes | None:
    """What the shared index holds for ``domain``: its app and its bundles'
    headers, in one value, so a worker selects with one lookup (None: neither)."""
    app = index.domains.get(domain)
    held = index.certs.get(domain, _EMPTY)
    if app is None and not held:
        return None
    return json.dumps([app, [[m.source, m.key_type, m.not_before, m.not_after, m.fingerprint, m.digest]
                             for m in held]], separators=(",", ":")).encode()


def read_name_record(domain: str, raw: bytes) -> tuple[str | None, DomainCerts]:
    app, held = json.loads(raw)
    return app, DomainCerts(CertMeta(domain, _INTERNED[s], _INTERNED[k], nb, na, fp, d)
                            for s, k, nb, na, fp, d in held)


class Index:
    """Apps, domains and certificate headers, kept in step with the store.

    Only the event loop thread mutates it. TLS contexts are cached under the
    digests of their stored bundles, so a replaced bundle needs no
    invalidation: the next selection names a new cache key.
    """

    def __init__(self) -> None:
        self.apps: dict[str, App] = {}
        self.domains: dict[str, str] = {}  # domain -> app
        self.certs: dict[str, DomainCerts] = {}
        self.revision = 0
        self.errors: dict[str, str] = {}  # store key -> why it was skipped
        self.changes = 0  # bumped by every applied change: lets readers cache derived views
        # While the store loads in the background (a serving process at start):
        # entries arrive from the snapshot and from per-name fetches, and the
        # watch may already deliver newer versions of the same keys. A key the
        # watch touched is the watch's from then on (its value is the newer one).
        self.loading = False
        self._touched: set[str] = set()
        self.fetched: set[str] = set()  # names whose entries were fetched on demand

    def start_loading(self) -> None:
        self.loading = True

    def finish_loading(self) -> None:
        self.loading = False
        self._touched = set()
        self.fetched = set()
        self.changes += 1

    def apply_loaded(self, key: str, value: bytes) -> bool:
        """An entry read by the initial load or a fetch: skipped if the watch has a newer one.
        True when the index took this version (the local copy keeps it too)."""
        if key in self._touched:
            return False
        self.apply(Event(EventKind.PUT, key, value, 0))
        return key not in self.errors

    def load_record(self, domain: str, app: str | None, held: DomainCerts) -> None:
        """A name as the local copy's record holds it (``name_record``): parsed
        and checked when it was written, so a restart does not parse bundles again."""
        domain = sys.intern(domain)
        if app is not None:
            self.domains[domain] = sys.intern(app)
        if held:
            self.certs[domain] = held

    def apply_put(self, key: str, value: bytes) -> None:
        self.apply(Event(EventKind.PUT, key, value, 0))

    def replace_with(self, fresh: Index) -> None:
        """Take over a freshly loaded index in one step (a full reload).

        An entry that no longer parses keeps the version this index holds:
        a reload must not drop a name to the default certificate because
        someone damaged its file."""
        for key in fresh.errors:
            self._carry(key, fresh)
        # In place: others hold these very dictionaries (the ACME manager's orders).
        for mine, theirs in ((self.apps, fresh.apps), (self.domains, fresh.domains), (self.certs, fresh.certs)):
            for gone in mine.keys() - theirs.keys():
                del mine[gone]
            mine.update(theirs)  # type: ignore[attr-defined]
        self.errors = fresh.errors
        self.revision = max(self.revision, fresh.revision)
        self.changes += 1

    def _carry(self, key: str, fresh: Index) -> None:
        if key.startswith(APPS):
            name = key[len(APPS):]
            if name in self.apps:
                fresh.apps[name] = self.apps[name]
        elif key.startswith(DOMAINS):
            name = key[len(DOMAINS):]
            if name in self.domains:
                fresh.domains[name] = self.domains[name]
        elif (parts := parse_cert_key(key)) is not None:
            domain, source, key_type = parts
            held = next((m for m in self.certs.get(domain, ()) if (m.source, m.key_type) == (source, key_type)),
                        None)
            if held is not None:
                fresh.certs[domain] = fresh.certs.get(domain, _EMPTY).replaced(held)

    def corrupted(self, limit: int = 100) -> dict[str, str]:
        """Damaged store entries (key -> why), for ``/healthz`` and ``edge check``;
        at most ``limit`` of them, in key order."""
        return dict(sorted(self.errors.items())[:limit])

    def apply_watched(self, event: Event) -> None:
        """A change from the store's watch."""
        if self.loading:
            self._touched.add(event.key)
        self.apply(event)

    def apply(self, event: Event) -> None:
        self.changes += 1
        key = event.key
        if event.revision:
            self.revision = max(self.revision, event.revision)
        try:
            if key.startswith(APPS):
                self._apply_app(key[len(APPS) :], event)
            elif key.startswith(DOMAINS):
                self._apply_domain(key[len(DOMAINS) :], event)
            elif key.startswith(CERTS):
                self._apply_cert(key, event)
            else:
                return
        except EntryError as exc:
            self.errors[key] = str(exc)
            log.error("store entry %s skipped: %s; the previous version stays in service", key, exc)
            return
        self.errors.pop(key, None)

    def _apply_app(self, name: str, event: Event) -> None:
        if event.kind is EventKind.DELETE:
            self.apps.pop(name, None)
        else:
            assert event.value is not None
            self.apps[name] = parse_app(name, event.value)

    def _apply_domain(self, domain: str, event: Event) -> None:
        if event.kind is EventKind.DELETE:
            self.domains.pop(domain, None)
        else:
            assert event.value is not None
            self.domains[sys.intern(domain)] = parse_domain(event.value)

    def _apply_cert(self, key: str, event: Event) -> None:
        if event.kind is EventKind.DELETE:
            parts = parse_cert_key(key)
            if parts is None:
                return
            domain, source, key_type = parts
            held = self.certs.get(domain)
            if held is not None:
                rest = held.without(source, key_type)
                if rest:
                    self.certs[domain] = rest
                else:
                    del self.certs[domain]
        else:
            assert event.value is not None
            meta = parse_cert(key, event.value)
            self.certs[meta.domain] = self.certs.get(meta.domain, _EMPTY).replaced(meta)

    def app_of(self, host: str) -> App | None:
        app = self.domains.get(host)
        return self.apps.get(app) if app is not None else None
