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


def _name(i: int) -> str:
    return f"n{i}.names.example.test"


def _make_range(args: tuple[Path, int, int]) -> None:
    """Write certificates start..end for the many-names scenario (a worker process)."""
    directory, start, end = args
    import json

    ca_key, ca_cert = _ca(directory.parent)
    key = serialization.load_pem_private_key((directory / "shared.key").read_bytes(), None)
    key_pem = _pem_key(key)
    for i in range(start, end):
        name = _name(i)
        cert = leaf(ca_key, ca_cert, [name], key).public_bytes(serialization.Encoding.PEM)
        parsed = x509.load_pem_x509_certificate(cert)
        header = json.dumps({
            "domain": name, "source": "custom", "key_type": "ecdsa",
            "not_before": parsed.not_valid_before_utc.timestamp(),
            "not_after": parsed.not_valid_after_utc.timestamp(),
            "fingerprint": parsed.fingerprint(hashes.SHA256()).hex(),
        }, sort_keys=True).encode() + b"\n"
        store_cert = directory / "store" / "certs" / "custom-ecdsa" / f"{name}.pem"
        store_cert.write_bytes(header + cert + key_pem)
        store_cert.chmod(0o600)
        (directory / "store" / "domains" / f"{name}.json").write_bytes(b'{"app": "bench"}\n')
        (directory / "pem" / f"{name}.crt").write_bytes(cert)
        (directory / "combined" / f"{name}.pem").write_bytes(cert + key_pem)


def many_names(count: int, directory: Path = CACHE) -> Path:
    """``count`` names with one certificate each, in edge's store layout, as PEM
    files for nginx and as combined PEMs for HAProxy. One shared key: signing
    is the only per-name work (~0.1 ms), so 100k names take ~10 s on 2 cores.
    Cached: made once per size."""
    import multiprocessing as mp

    target = directory / f"names-{count}"
    if (target / "done").exists():
        return target
    for sub in ("store/certs/custom-ecdsa", "store/domains", "store/apps", "pem", "combined"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    _ca(directory)
    key_path = target / "shared.key"
    key_path.write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
    key_path.chmod(0o600)
    step = 5000
    ranges = [(target, start, min(start + step, count)) for start in range(0, count, step)]
    with mp.Pool(2) as pool:
        for done, _ in enumerate(pool.imap_unordered(_make_range, ranges), 1):
            print(f"\r  generating {count} certificates: {min(done * step, count)}", end="", flush=True)
    print()
    (target / "names.txt").write_text("".join(_name(i) + "\n" for i in range(count)))
    (target / "done").write_text("ok\n")
    return target
