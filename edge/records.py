"""The vocabulary of the store's records, and how writers encode them.

At the bottom of the layers (it imports nothing of edge): the store, TLS
bundle validation, the ACME settings and the writers above all name
certificate sources and key types from here.

Every writer (the CLI and admin operations, ``certs-import``, the ACME
manager) encodes through here, so a record has one shape. The readers'
decoders are in ``edge.store.index`` (``parse_app``, ``parse_domain``,
``parse_cert``) for now; they belong here beside their encoders.

The enums are ``StrEnum``: a member is the very string stored in keys and
headers, so code comparing with a plain string (or a dict keyed on one) sees
no difference.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from typing import Protocol


class CertSource(enum.StrEnum):
    """Who put a certificate in the store (``certs/<source>-<key type>/<domain>``)."""

    CUSTOM = "custom"  # uploaded (domains-ssl, certs-import, the admin API)
    ACME = "acme"  # ordered by edge


class KeyType(enum.StrEnum):
    ECDSA = "ecdsa"  # P-256
    RSA = "rsa"


SOURCES: tuple[CertSource, ...] = tuple(CertSource)
KEY_TYPES: tuple[KeyType, ...] = tuple(KeyType)


class CertHeaderFields(Protocol):
    """What a certificate's header line says (``edge.store.index.CertMeta`` has it)."""

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
    other settings (``hsts``, ``maintenance``, ``error_pages``: edge.store.appsettings)."""
    record = {**(settings or {}), "backends": list(backends), "force_https": force_https}
    return json.dumps(record, indent=1).encode() + b"\n"
