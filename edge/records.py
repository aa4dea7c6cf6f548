"""The vocabulary of the store's records, and how writers encode them.

At the bottom of the layers (it imports nothing of edge): the store, TLS
bundle validation, the ACME settings and the writers above all name
certificate sources and key types from here.

Every writer (the CLI and admin operations, ``certs-import``, the ACME
manager) encodes through here, and every reader (the local copy's writer,
the CLI's checks, the TLS loader, ACME) decodes through here: each record's
encoder and decoder sit side by side, so a record has one shape. That
includes the local copy's ``names`` record (a domain's app and bundle
headers, ``encode_name_record``/``decode_name_record``).

The enums are ``StrEnum``: a member is the very string stored in keys and
headers, so code comparing with a plain string (or a dict keyed on one) sees
no difference.
"""

from __future__ import annotations

import enum
import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from edge.appsettings import parse_error_pages, parse_hsts


class CertSource(enum.StrEnum):
    """Who put a certificate in the store (``certs/<source>-<key type>/<domain>``)."""

    CUSTOM = "custom"  # uploaded (domains-ssl, certs-import, the admin API)
    ACME = "acme"  # ordered by edge


class KeyType(enum.StrEnum):
    ECDSA = "ecdsa"  # P-256
    RSA = "rsa"


SOURCES: tuple[CertSource, ...] = tuple(CertSource)
KEY_TYPES: tuple[KeyType, ...] = tuple(KeyType)
_INTERNED: dict[str, str] = {s: s for s in (*SOURCES, *KEY_TYPES)}

CERTS = "certs/"  # the key prefix of certificate records (edge.store.base names the others)


def cert_key(domain: str, source: str, key_type: str) -> str:
    return f"{CERTS}{source}-{key_type}/{domain}"


def parse_cert_key(key: str) -> tuple[str, str, str] | None:
    """``certs/custom-ecdsa/www.example.com`` -> (domain, source, key_type)."""
    if not key.startswith(CERTS):
        return None
    kind, _, domain = key[len(CERTS) :].partition("/")
    source, _, key_type = kind.partition("-")
    if not domain or not source or not key_type:
        return None
    return domain, source, key_type


class EntryError(ValueError):
    """A store value that does not have the expected shape."""


class CertHeaderFields(Protocol):
    """What a certificate's header line says (``CertMeta`` below has it)."""

    @property
    def domain(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def key_type(self) -> str: ...
    @property
    def not_before(self) -> float: ...
    @property
    def not_after(self) -> float: ...
    @property
    def fingerprint(self) -> str: ...


def encode_bundle(header: CertHeaderFields, pem: bytes, issuer: str | None = None) -> bytes:
    """A stored certificate: one JSON header line (read without parsing the
    PEM), then the chain and key. ``issuer``: the ACME directory it came from."""
    fields: dict[str, object] = {
        "domain": header.domain,
        "source": str(header.source),
        "key_type": str(header.key_type),
        "not_before": header.not_before,
        "not_after": header.not_after,
        "fingerprint": header.fingerprint,
    }
    if issuer is not None:
        fields["issuer"] = issuer
    return json.dumps(fields, sort_keys=True).encode() + b"\n" + pem


def encode_domain(app: str) -> bytes:
    """``domains/<domain>``: the app it is attached to."""
    return json.dumps({"app": app}).encode() + b"\n"


def encode_app(backends: Iterable[str], force_https: bool, settings: Mapping[str, object] | None = None) -> bytes:
    """``apps/<name>``: its backends, whether plain HTTP is redirected, and its
    other settings (``hsts``, ``maintenance``, ``error_pages``: edge.appsettings)."""
    record = {**(settings or {}), "backends": list(backends), "force_https": force_https}
    return json.dumps(record, indent=1).encode() + b"\n"


# --- decoding (every reader) -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class App:
    name: str
    backends: tuple[str, ...]
    force_https: bool = True
    # Per-app settings (edge.appsettings), prepared for the data path:
    hsts: bytes = b""  # the Strict-Transport-Security value for HTTPS answers; b"": none
    maintenance: bool = False  # answer 503 with the maintenance page, the backend untouched
    error_pages: tuple[tuple[int, bytes], ...] = ()  # (status, HTML) replacing edge's own bodies

    def error_page(self, status: int) -> bytes | None:
        for code, html in self.error_pages:
            if code == status:
                return html
        return None


class CertMeta(NamedTuple):
    """The header of one stored bundle; enough to choose it without parsing it.

    A named tuple: the shared index decodes one per bundle of each name a
    handshake looks up (a frozen dataclass costs several times more to
    build); the store key is derived, and the short strings are interned.
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
    digest: int = 0  # 64 bits

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


def entry_digest(value: bytes) -> int:
    """What identifies one stored version of an entry (~4 µs for a bundle)."""
    return int.from_bytes(hashlib.sha256(value).digest()[:8])


def split_bundle(value: bytes) -> tuple[bytes, bytes]:
    """(header line, PEM) of a stored bundle (``encode_bundle``)."""
    header, sep, pem = value.partition(b"\n")
    if not sep:
        raise EntryError("no header line before the PEM")
    return header, pem


def parse_app(name: str, value: bytes) -> App:
    """``encode_app``'s record."""
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
    """``encode_domain``'s record: the app."""
    try:
        app = json.loads(value)["app"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EntryError(f"not a domain record ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(app, str):
        raise EntryError("'app' is not a string")
    return sys.intern(app)  # one string per app, however many domains it has


def parse_cert(key: str, value: bytes, digest: int | None = None) -> CertMeta:
    """``encode_bundle``'s header, stored under ``key`` (``digest``: the value's, when known)."""
    parts = parse_cert_key(key)
    if parts is None:
        raise EntryError("not a certificate key")
    domain, source, key_type = parts
    if source not in _INTERNED or key_type not in _INTERNED:
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
            digest=entry_digest(value) if digest is None else digest,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise EntryError(f"bad header line ({exc.__class__.__name__}: {exc})") from None


# --- the local copy's record of a name (edge.store.localcopy) -----------------------------------
def encode_name_record(app: str | None, held: Iterable[CertMeta]) -> bytes:
    """A domain's app and its bundles' headers in one value: a worker selects with one lookup."""
    return json.dumps([app, [[m.source, m.key_type, m.not_before, m.not_after, m.fingerprint, m.digest]
                             for m in held]], separators=(",", ":")).encode()


def decode_name_record(domain: str, raw: bytes) -> tuple[str | None, DomainCerts]:
    app, held = json.loads(raw)
    return app, DomainCerts(CertMeta(domain, _INTERNED[s], _INTERNED[k], nb, na, fp, d)
                            for s, k, nb, na, fp, d in held)
