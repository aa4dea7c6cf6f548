"""SPEC §3: every refused upload says what is wrong and changes nothing."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from tests import pki
from tests.integration.conftest import EdgeProcess, require_tool, wait_for

DOMAIN = "val.custom.test"


@pytest.fixture(scope="module")
def served_pem(edge: EdgeProcess, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> pki.Pem:
    """A good certificate in service for DOMAIN before the bad uploads are tried."""
    pem = pki.issue(ca, DOMAIN)
    root = tmp_path_factory.mktemp("good")
    (root / "c.pem").write_bytes(pem.cert)
    (root / "k.pem").write_bytes(pem.key)
    edge.cli("domains-add", DOMAIN, "--app", "demo", "--cert", str(root / "c.pem"), "--key", str(root / "k.pem"))
    wait_for(lambda: edge.handshake_or_empty(DOMAIN) == pem.leaf_der)
    return pem


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificates(pem)[0].public_bytes(serialization.Encoding.DER)


def _openssl_signed(tmp: Path, digest: str) -> pki.Pem:
    """A leaf signed with a weak digest; cryptography refuses to make one, openssl does."""
    require_tool("openssl")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-subj", "/CN=weak test CA", "-days", "10")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={DOMAIN}")
    (tmp / "ext").write_text(f"subjectAltName=DNS:{DOMAIN}\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.crt", "-days", "10", f"-{digest}", "-extfile", "ext")
    return pki.Pem((tmp / "leaf.crt").read_bytes(), (tmp / "leaf.key").read_bytes())


def bad_uploads(ca: trustme.CA, tmp: Path) -> dict[str, tuple[bytes, bytes, str]]:
    """name -> (cert file bytes, key file bytes, expected words in the message)."""
    good = pki.issue(ca, DOMAIN)
    other = pki.issue(ca, DOMAIN)
    key = serialization.load_pem_private_key(good.key, None)
    now = dt.datetime.now(dt.UTC)
    stranger = trustme.CA().create_child_ca()
    intermediate = ca.create_child_ca()
    chained = pki.issue(intermediate, DOMAIN)  # leaf + intermediate
    leaf_only = chained.cert.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
    p12 = pkcs12.serialize_key_and_certificates(
        b"x", key, x509.load_pem_x509_certificates(good.cert)[0], None,  # type: ignore[arg-type]
        serialization.BestAvailableEncryption(b"pw"),
    )
    encrypted = key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    wrong_domain = pki.issue(ca, "other.custom.test")
    expired = pki.issue(ca, DOMAIN, not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1))
    future = pki.issue(ca, DOMAIN, not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=10))
    weak_rsa = pki.custom(ca, DOMAIN, key=pki.rsa_key(1024))
    p521 = pki.custom(ca, DOMAIN, key=ec.generate_private_key(ec.SECP521R1()))
    (tmp / "sha1").mkdir()
    (tmp / "md5").mkdir()
    sha1 = _openssl_signed(tmp / "sha1", "sha1")
    md5 = _openssl_signed(tmp / "md5", "md5")
    return {
        "der-certificate": (_der(good.cert), good.key, "binary DER form, not PEM; convert it with `openssl x509"),
        "pkcs12": (p12, good.key, "PKCS#12 (.pfx/.p12) archive, not PEM"),
        "garbage": (b"this is not a certificate\n", good.key, "no PEM certificate found"),
        "empty": (b"", good.key, "the certificate file is empty"),
        "swapped": (good.key, good.cert, "were --cert and --key swapped?"),
        "encrypted-key": (good.cert, encrypted, "encrypted with a passphrase; remove it with `openssl pkey"),
        "key-mismatch": (good.cert, other.key, "the private key does not match the certificate"),
        "wrong-domain": (*wrong_domain.pair, f"does not cover {DOMAIN} (it names other.custom.test)"),
        "expired": (*expired.pair, "the certificate expired on"),
        "not-yet-valid": (*future.pair, "is not valid before"),
        "chain-does-not-link": (leaf_only + stranger.cert_pem.bytes(), chained.key, "the chain does not link"),
        "weak-rsa": (weak_rsa.cert, weak_rsa.key, "the RSA key has 1024 bits, under the 2048"),
        "curve-p521": (p521.cert, p521.key, "the EC key is on curve secp521r1; only P-256 and P-384"),
        "sha1": (sha1.cert, sha1.key, "signed with SHA1"),
        "md5": (md5.cert, md5.key, "signed with MD5"),
        "too-large": (good.cert + b"\n" + b"# padding\n" * 7000, good.key, "over the 64 KiB limit"),
        "too-many-certificates": (good.cert + ca.cert_pem.bytes() * 10, good.key, "over the limit of 10"),
    }


@pytest.fixture(scope="module")
def cases(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes, str]]:
    return bad_uploads(ca, tmp_path_factory.mktemp("bad"))


CASE_NAMES = [
    "der-certificate", "pkcs12", "garbage", "empty", "swapped", "encrypted-key", "key-mismatch",
    "wrong-domain", "expired", "not-yet-valid", "chain-does-not-link", "weak-rsa", "curve-p521",
    "sha1", "md5", "too-large", "too-many-certificates",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_refused_upload_changes_nothing(case: str, cases, edge: EdgeProcess, served_pem: pki.Pem,
                                        tmp_path: Path) -> None:
    cert_bytes, key_bytes, expected = cases[case]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_bytes)
    key.write_bytes(key_bytes)
    store_before = sorted(p.read_bytes() for p in (edge.root / "store").rglob("*") if p.is_file())
    result = edge.cli("domains-ssl", DOMAIN, "--cert", str(cert), "--key", str(key), check=False)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert lines[0].startswith("edge: error: ")
    # Nothing changed: the store holds the same bytes, and the old certificate is served.
    assert sorted(p.read_bytes() for p in (edge.root / "store").rglob("*") if p.is_file()) == store_before
    assert edge.handshake(DOMAIN) == served_pem.leaf_der


def test_same_refusal_through_domains_add(edge: EdgeProcess, cases, tmp_path: Path) -> None:
    cert_bytes, key_bytes, _expected = cases["key-mismatch"]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_bytes)
    key.write_bytes(key_bytes)
    result = edge.cli("domains-add", "fresh.custom.test", "--app", "demo", "--cert", str(cert), "--key", str(key),
                      check=False)
    assert result.returncode != 0
    # A refused domains-add does not attach the domain either.
    assert "fresh.custom.test" not in edge.cli("domains").stdout


def test_reordered_bundle_accepted_with_notice(edge: EdgeProcess, ca: trustme.CA, tmp_path: Path) -> None:
    intermediate = ca.create_child_ca()
    pem = pki.issue(intermediate, "order.custom.test")
    blocks = [b + b"-----END CERTIFICATE-----\n" for b in pem.cert.split(b"-----END CERTIFICATE-----\n") if b.strip()]
    assert len(blocks) == 2
    (tmp_path / "c.pem").write_bytes(blocks[1] + blocks[0])  # intermediate first
    (tmp_path / "k.pem").write_bytes(pem.key)
    result = edge.cli("domains-add", "order.custom.test", "--app", "demo",
                      "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"))
    assert "out of order; reordered leaf first" in result.stderr
    wait_for(lambda: edge.handshake_or_empty("order.custom.test") == pem.leaf_der)
    stored = (edge.root / "store" / "certs" / "custom-ecdsa" / "order.custom.test.pem").read_bytes()
    assert stored.index(blocks[0]) < stored.index(blocks[1])


def test_self_signed_accepted_with_warning(edge: EdgeProcess, tmp_path: Path) -> None:
    pem = pki.custom(None, "self.custom.test")
    (tmp_path / "c.pem").write_bytes(pem.cert)
    (tmp_path / "k.pem").write_bytes(pem.key)
    result = edge.cli("domains-add", "self.custom.test", "--app", "demo",
                      "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"))
    assert "self-signed" in result.stderr and "browsers will not trust it" in result.stderr
    wait_for(lambda: edge.handshake_or_empty("self.custom.test") == pem.leaf_der)


def test_private_keys_stored_0600(edge: EdgeProcess, served_pem: pki.Pem) -> None:
    path = edge.root / "store" / "certs" / "custom-ecdsa" / f"{DOMAIN}.pem"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (edge.root / "dev" / "platform.key").stat().st_mode & 0o777 == 0o600
    assert (edge.root / "dev" / "ca.key").stat().st_mode & 0o777 == 0o600
    # And never in the log.
    assert b"PRIVATE KEY" not in bytes(edge.log)
