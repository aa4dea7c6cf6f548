"""Certificates for tests: trustme for ordinary chains, cryptography for the
odd ones trustme will not make (SHA-1, weak keys, odd curves, self-signed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Pem:
    cert: bytes  # leaf first, then intermediates
    key: bytes

    @property
    def pair(self) -> tuple[bytes, bytes]:
        return self.cert, self.key

    @property
    def leaf_der(self) -> bytes:
        return x509.load_pem_x509_certificates(self.cert)[0].public_bytes(serialization.Encoding.DER)


def issue(ca: trustme.CA, *identities: str, ecdsa: bool = True,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Pem:
    leaf = ca.issue_cert(
        *identities,
        key_type=trustme.KeyType.ECDSA if ecdsa else trustme.KeyType.RSA,
        not_before=not_before,
        not_after=not_after,
    )
    return Pem(b"".join(p.bytes() for p in leaf.cert_chain_pems), leaf.private_key_pem.bytes())


def _key_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def custom(
    ca: trustme.CA | None,
    *identities: str,
    key: object | None = None,
    hash_alg: hashes.HashAlgorithm | None = None,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Pem:
    """A leaf built by hand; ``ca=None`` makes it self-signed."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identities[0] if identities else "test")])
    if ca is None:
        issuer_name, signing_key = subject, key
    else:
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        issuer_name = ca_cert.subject
        signing_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - dt.timedelta(days=1))
        .not_valid_after(not_after or NOW + dt.timedelta(days=90))
    )
    if identities:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in identities]), critical=False
        )
    cert = builder.sign(signing_key, hash_alg or hashes.SHA256())  # type: ignore[arg-type]
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)
