"""Every record the writers encode (edge.records) reads back as written
through the index's decoders."""

from __future__ import annotations

import json

from edge.records import (
    KEY_TYPES,
    SOURCES,
    CertMeta,
    CertSource,
    KeyType,
    encode_app,
    encode_bundle,
    encode_domain,
    parse_app,
    parse_cert,
    parse_domain,
    split_bundle,
)
from edge.store.base import cert_key

PEM = (b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"
       b"-----BEGIN PRIVATE KEY-----\ny\n-----END PRIVATE KEY-----\n")


def test_a_bundle_reads_back_as_written() -> None:
    meta = CertMeta("www.example.com", CertSource.ACME, KeyType.RSA, 1000.0, 2000.0, "ab:cd")
    value = encode_bundle(meta, PEM, issuer="https://ca.example/directory")
    read = parse_cert(cert_key(meta.domain, meta.source, meta.key_type), value)
    assert (read.domain, read.source, read.key_type) == ("www.example.com", "acme", "rsa")
    assert (read.not_before, read.not_after, read.fingerprint) == (1000.0, 2000.0, "ab:cd")
    header, pem = split_bundle(value)
    assert pem == PEM and json.loads(header)["issuer"] == "https://ca.example/directory"
    assert "issuer" not in json.loads(split_bundle(encode_bundle(meta, PEM))[0])


def test_the_store_key_names_plain_strings() -> None:
    # StrEnum members format as their values: the keys on disk do not change.
    assert cert_key("a.example", CertSource.CUSTOM, KeyType.ECDSA) == "certs/custom-ecdsa/a.example"
    assert SOURCES == ("custom", "acme") and KEY_TYPES == ("ecdsa", "rsa")


def test_domain_and_app_records_read_back() -> None:
    assert parse_domain(encode_domain("shop")) == "shop"
    app = parse_app("shop", encode_app(["127.0.0.1:9000"], False))
    assert app.backends == ("127.0.0.1:9000",) and app.force_https is False
