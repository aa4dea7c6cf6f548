"""Benchmark certificates: a test CA, ECDSA P-256 and RSA-2048 leaves, and
many-name bundles made fast (one shared key, each leaf signed by the CA).

Everything is cached under ``benchmarks/.cache`` between runs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from benchmarks.systems import BENCH_HOST, Certificates

CACHE = Path(__file__).parent / ".cache"


def _pem_key(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge benchmark CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_path.write_bytes(_pem_key(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str],
         key: object) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def bench_certificates(directory: Path = CACHE) -> Certificates:
    """The CA and the two leaves for ``BENCH_HOST``, made once."""
    ca_key, ca_cert = _ca(directory)
    for kind, make in (("ecdsa", lambda: ec.generate_private_key(ec.SECP256R1())),
                       ("rsa", lambda: rsa.generate_private_key(65537, 2048))):
        cert_path, key_path = directory / f"{kind}.crt", directory / f"{kind}.key"
        if not (cert_path.exists() and key_path.exists()):
            key = make()
            cert = leaf(ca_key, ca_cert, [BENCH_HOST], key)
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(_pem_key(key))
            key_path.chmod(0o600)
    return Certificates(directory / "ecdsa.crt", directory / "ecdsa.key", directory / "rsa.crt",
                        directory / "rsa.key", directory / "ca.crt")
