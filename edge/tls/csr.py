"""Private key + certificate signing request for a domain (``edge csr``).

What ``openssl req -new -newkey rsa:2048 -sha256 -nodes`` does, with the
domain in subjectAltName as CAs require (CA/B Forum Baseline Requirements
§7.1.2.7.12), and ECDSA keys too.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KEY_TYPES = ("rsa2048", "rsa4096", "ec256", "ec384")
_ATTRIBUTES = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "emailAddress": NameOID.EMAIL_ADDRESS,
}


def parse_subject(text: str) -> list[x509.NameAttribute]:
    """``/C=FR/O=Example`` (openssl style) or ``C=FR,O=Example``."""
    text = text.strip()
    parts = [p for p in re.split(r"/" if text.startswith("/") else r",", text) if p.strip()]
    out = []
    for part in parts:
        field, sep, value = part.partition("=")
        field = field.strip()
        if not sep or field not in _ATTRIBUTES or not value.strip():
            raise ValueError(
                f"subject part {part!r} is not FIELD=value with FIELD one of {', '.join(_ATTRIBUTES)}"
            )
        out.append(x509.NameAttribute(_ATTRIBUTES[field], value.strip()))
    return out


def make_key(key_type: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if key_type == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    if key_type == "rsa4096":
        return rsa.generate_private_key(65537, 4096)
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")


def make_csr(domain: str, key_type: str = "rsa2048", subject: str = "") -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM) for ``domain`` (canonical, maybe a wildcard)."""
    attributes = parse_subject(subject) if subject else []
    if not any(a.oid == NameOID.COMMON_NAME for a in attributes):
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, domain))
    key = make_key(key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attributes))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)
