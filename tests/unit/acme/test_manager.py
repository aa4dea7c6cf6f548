"""The ACME manager's policy (SPEC §2, §7) as pure functions, and the
TLS-ALPN-01 validation certificate (RFC 8737 §3)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edge.acme.client import ACME_IDENTIFIER_OID, tls_alpn_certificate
from edge.acme.manager import STANDBY_BEFORE, DomainStatus, backoff, needs, renew_at
from edge.store.index import CertMeta, DomainCerts

DAY = 86400.0
NOW = 1_800_000_000.0


def held(*metas: CertMeta) -> DomainCerts:
    out = DomainCerts()
    for meta in metas:
        out = out.replaced(meta)
    return out


def cert(source: str, key_type: str, not_before: float, not_after: float) -> CertMeta:
    return CertMeta("www.example.com", source, key_type, not_before, not_after, f"{source}{key_type}{not_after}")


def test_no_certificate_at_all_orders_every_key_type():
    assert needs(None, ("ecdsa", "rsa"), NOW) == (["ecdsa", "rsa"], None)


def test_custom_far_from_expiry_needs_nothing_until_the_standby_window():
    custom = cert("custom", "ecdsa", NOW - 10 * DAY, NOW + 60 * DAY)
    due, later = needs(held(custom), ("ecdsa",), NOW)
    assert due == [] and later == NOW + 60 * DAY - STANDBY_BEFORE


def test_custom_within_14_days_gets_a_standby():
    custom = cert("custom", "ecdsa", NOW - 80 * DAY, NOW + 13 * DAY)
    assert needs(held(custom), ("ecdsa",), NOW)[0] == ["ecdsa"]


def test_expired_custom_counts_as_missing():
    custom = cert("custom", "rsa", NOW - 90 * DAY, NOW - 1)
    assert needs(held(custom), ("ecdsa",), NOW)[0] == ["ecdsa"]


def test_the_longest_lived_custom_decides():
    # An ECDSA custom about to expire, an RSA custom good for months: still served by custom.
    metas = held(cert("custom", "ecdsa", NOW - 80 * DAY, NOW + 2 * DAY),
                 cert("custom", "rsa", NOW - DAY, NOW + 89 * DAY))
    assert needs(metas, ("ecdsa",), NOW)[0] == []


def test_acme_renewed_at_two_thirds_of_its_lifetime():
    acme = cert("acme", "ecdsa", NOW - 30 * DAY, NOW + 60 * DAY)
    assert renew_at(acme) == NOW + 30 * DAY
    due, later = needs(held(acme), ("ecdsa",), NOW)
    assert due == [] and later == NOW + 30 * DAY
    assert needs(held(acme), ("ecdsa",), NOW + 30 * DAY)[0] == ["ecdsa"]


def test_each_key_type_on_its_own():
    acme = cert("acme", "ecdsa", NOW - DAY, NOW + 89 * DAY)
    assert needs(held(acme), ("ecdsa", "rsa"), NOW)[0] == ["rsa"]


def test_backoff_doubles_is_capped_and_honours_retry_after():
    assert [backoff(n, 60, 3600) for n in (1, 2, 3, 4, 10)] == [60, 120, 240, 480, 3600]
    assert backoff(1, 60, 3600, retry_after=1800) == 1800
    assert backoff(3, 60, 3600, retry_after=10) == 240


def test_status_round_trip_and_garbage():
    status = DomainStatus("failed", failures=2, last_error="boom", next_attempt=NOW, updated=NOW - 5)
    assert DomainStatus.from_bytes(status.to_bytes()) == status
    assert DomainStatus.from_bytes(b"not json") is None


@pytest.mark.parametrize("domain", ["www.example.com", "xn--bcher-kva.example"])
def test_tls_alpn_certificate_carries_the_key_authorization_digest(domain: str):
    pem = tls_alpn_certificate(domain, "token.thumbprint")
    leaf = x509.load_pem_x509_certificate(pem)
    load_pem_private_key(pem, None)  # the key travels in the same PEM
    extension = leaf.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert extension.critical
    # DER OCTET STRING (tag 4, length 32) of SHA-256(key authorization)
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [domain]
