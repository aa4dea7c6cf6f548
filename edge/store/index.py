"""The in-memory index every edge process keeps of the store.

A small entry per name: apps, which app each domain belongs to, and for each
domain the *header* of each certificate bundle (source, key type, validity,
fingerprint). No certificate is parsed here and no PEM is kept: the TLS
layer reads the bundle from the store when it first builds its context.

Values that do not parse (someone edited a file by hand) are reported and
skipped; the previous good entry for that key stays in service.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from edge.store.base import APPS, CERTS, DOMAINS, Event, EventKind, parse_cert_key

log = logging.getLogger(__name__)

SOURCES = ("custom", "acme")
KEY_TYPES = ("ecdsa", "rsa")


class EntryError(ValueError):
    """A store value that does not have the expected shape."""


@dataclass(frozen=True, slots=True)
class App:
    name: str
    backends: tuple[str, ...]
    force_https: bool = True


@dataclass(frozen=True, slots=True)
class CertMeta:
    """The header of one stored bundle; enough to choose it without parsing it."""

    store_key: str
    domain: str
    source: str
    key_type: str
    not_before: float
    not_after: float
    fingerprint: str

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after


@dataclass(slots=True)
class DomainCerts:
    """Bundles held for one domain, by source then key type."""

    by_source: dict[str, dict[str, CertMeta]] = field(default_factory=dict)

    def valid(self, source: str, now: float) -> tuple[CertMeta, ...]:
        held = self.by_source.get(source)
        if not held:
            return ()
        return tuple(m for m in held.values() if m.valid_at(now))


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
    except (ValueError, KeyError, TypeError) as exc:
        raise EntryError(f"not an app record ({exc.__class__.__name__}: {exc})") from None
    return App(name, backends, force_https)


def parse_domain(value: bytes) -> str:
    try:
        app = json.loads(value)["app"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EntryError(f"not a domain record ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(app, str):
        raise EntryError("'app' is not a string")
    return app


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
            store_key=key,
            domain=domain,
            source=source,
            key_type=key_type,
            not_before=float(data["not_before"]),
            not_after=float(data["not_after"]),
            fingerprint=str(data["fingerprint"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise EntryError(f"bad header line ({exc.__class__.__name__}: {exc})") from None


class Index:
    """Apps, domains and certificate headers, kept in step with the store.

    Only the event loop thread mutates it. TLS contexts are cached under the
    fingerprints of their bundles, so a replaced bundle needs no invalidation:
    the next selection names a new cache key.
    """

    def __init__(self) -> None:
        self.apps: dict[str, App] = {}
        self.domains: dict[str, str] = {}  # domain -> app
        self.certs: dict[str, DomainCerts] = {}
        self.revision = 0
        self.errors: dict[str, str] = {}  # store key -> why it was skipped

    def apply_put(self, key: str, value: bytes) -> None:
        self.apply(Event(EventKind.PUT, key, value, 0))

    def replace_with(self, fresh: Index) -> None:
        """Take over a freshly loaded index in one step (a full reload)."""
        self.apps, self.domains, self.certs = fresh.apps, fresh.domains, fresh.certs
        self.errors = fresh.errors
        self.revision = max(self.revision, fresh.revision)

    def apply(self, event: Event) -> None:
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
            self.domains[domain] = parse_domain(event.value)

    def _apply_cert(self, key: str, event: Event) -> None:
        if event.kind is EventKind.DELETE:
            parts = parse_cert_key(key)
            if parts is None:
                return
            domain, source, key_type = parts
            held = self.certs.get(domain)
            if held and key_type in held.by_source.get(source, {}):
                del held.by_source[source][key_type]
                if not held.by_source[source]:
                    del held.by_source[source]
                if not held.by_source:
                    del self.certs[domain]
        else:
            assert event.value is not None
            meta = parse_cert(key, event.value)
            held = self.certs.setdefault(meta.domain, DomainCerts())
            held.by_source.setdefault(meta.source, {})[meta.key_type] = meta

    def app_of(self, host: str) -> App | None:
        app = self.domains.get(host)
        return self.apps.get(app) if app is not None else None
