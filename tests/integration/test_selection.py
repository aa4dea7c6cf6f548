"""SPEC §2, rule by rule, with real handshakes against a running edge."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge import config as config_mod
from edge.operations import Operations
from edge.store.file import FileStore
from edge.tls import bundle as bundles
from tests import pki
from tests.integration.conftest import EdgeProcess, require_tool, wait_for


def cert_args(paths: tuple[str, str]) -> tuple[str, ...]:
    return ("--cert", paths[0], "--key", paths[1])


def platform_der(edge: EdgeProcess) -> bytes:
    cert = x509.load_pem_x509_certificate((edge.root / "dev" / "platform.crt").read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def served(edge: EdgeProcess, name: str | None, want: bytes, **kwargs: bool) -> bytes:
    """Wait until ``name`` is served ``want`` (the store is followed asynchronously)."""
    return wait_for(lambda: edge.handshake_or_empty(name, **kwargs) == want and want, timeout=5)


def test_platform_app_domain_gets_platform_certificate(edge: EdgeProcess) -> None:
    assert edge.handshake("demo.edge.test") == platform_der(edge)
    result = edge.curl(f"https://demo.edge.test:{edge.https_port}/hello", "--cacert", str(edge.dev_ca))
    assert result.returncode == 0, result.stderr
    assert '"path": "/hello"' in result.stdout


def test_custom_certificate_for_exact_domain(edge: EdgeProcess, ca, write_pem, tmp_path) -> None:
    pem = pki.issue(ca, "www.custom.test")
    cert, key = write_pem(pem)
    out = edge.cli("domains-add", "www.custom.test", "--app", "demo", "--cert", cert, "--key", key)
    assert "www.custom.test added to app demo" in out.stdout
    served(edge, "www.custom.test", pem.leaf_der)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    result = edge.curl(f"https://www.custom.test:{edge.https_port}/x", "--cacert", str(ca_file))
    assert result.returncode == 0, result.stderr
    assert '"path": "/x"' in result.stdout


def test_wildcard_covers_one_level_only(edge: EdgeProcess, ca, write_pem) -> None:
    pem = pki.issue(ca, "*.wild.test")
    cert, key = write_pem(pem)
    edge.cli("domains-add", "*.wild.test", "--app", "demo", "--cert", cert, "--key", key)
    served(edge, "a.wild.test", pem.leaf_der)
    default = platform_der(edge)
    assert edge.handshake("a.b.wild.test") == default
    assert edge.handshake("wild.test") == default
    # The wildcard domain routes its names to the app too.
    result = edge.curl(f"https://api.wild.test:{edge.https_port}/w", "-k")
    assert '"path": "/w"' in result.stdout


def test_exact_custom_beats_wildcard(edge: EdgeProcess, ca, write_pem) -> None:
    wild = pki.issue(ca, "*.both.test")
    exact = pki.issue(ca, "www.both.test")
    wild_cert, wild_key = write_pem(wild)
    exact_cert, exact_key = write_pem(exact)
    edge.cli("domains-add", "*.both.test", "--app", "demo", "--cert", wild_cert, "--key", wild_key)
    edge.cli("domains-add", "www.both.test", "--app", "demo", "--cert", exact_cert, "--key", exact_key)
    served(edge, "www.both.test", exact.leaf_der)
    served(edge, "api.both.test", wild.leaf_der)


def _write_acme(edge: EdgeProcess, domain: str, pem: pki.Pem) -> None:
    """Put an acme bundle in the store the way the ACME manager will."""
    cfg = config_mod.load(edge.config)
    ops = Operations(cfg, FileStore(cfg.store.path))
    validated = bundles.validate(pem.cert, pem.key, domain)
    asyncio.run(ops._write_bundle(domain, "acme", validated))


def test_expired_custom_falls_through_to_acme(edge: EdgeProcess, ca, write_pem) -> None:
    now = dt.datetime.now(dt.UTC)
    short = pki.issue(ca, "lapse.custom.test", not_after=now + dt.timedelta(seconds=3))
    acme = pki.issue(ca, "lapse.custom.test")
    edge.cli("domains-add", "lapse.custom.test", "--app", "demo", *cert_args(write_pem(short)))
    _write_acme(edge, "lapse.custom.test", acme)
    served(edge, "lapse.custom.test", short.leaf_der)  # custom beats acme while valid
    time.sleep(max(0.0, (now + dt.timedelta(seconds=3.2) - dt.datetime.now(dt.UTC)).total_seconds()))
    assert edge.handshake("lapse.custom.test") == acme.leaf_der
    rows = edge.cli("domains", "--json").stdout
    assert re.search(r'"domain": "lapse.custom.test",\s*"app": "demo",\s*"serving": "acme"', rows)


def test_deleted_custom_falls_through_to_acme(edge: EdgeProcess, ca, write_pem) -> None:
    custom = pki.issue(ca, "drop.custom.test")
    acme = pki.issue(ca, "drop.custom.test")
    edge.cli("domains-add", "drop.custom.test", "--app", "demo", *cert_args(write_pem(custom)))
    _write_acme(edge, "drop.custom.test", acme)
    served(edge, "drop.custom.test", custom.leaf_der)
    edge.cli("domains-ssl", "drop.custom.test", "--disable")
    served(edge, "drop.custom.test", acme.leaf_der)


def test_expired_custom_without_acme_falls_to_wildcard(edge: EdgeProcess, ca, write_pem) -> None:
    now = dt.datetime.now(dt.UTC)
    wild = pki.issue(ca, "*.fall.test")
    short = pki.issue(ca, "www.fall.test", not_after=now + dt.timedelta(seconds=2))
    edge.cli("domains-add", "*.fall.test", "--app", "demo", *cert_args(write_pem(wild)))
    edge.cli("domains-add", "www.fall.test", "--app", "demo", *cert_args(write_pem(short)))
    served(edge, "www.fall.test", short.leaf_der)
    served(edge, "www.fall.test", wild.leaf_der)


def test_unknown_name_and_no_sni_get_default(edge: EdgeProcess) -> None:
    default = platform_der(edge)
    assert edge.handshake("unknown.example.org") == default
    assert edge.handshake(None) == default
    # "localhost" is no valid SNI host name: treated as absent.
    assert edge.handshake("localhost") == default


def test_rsa_only_client_gets_rsa_ecdsa_client_gets_ecdsa(edge: EdgeProcess, ca, write_pem) -> None:
    ecdsa = pki.issue(ca, "dual.custom.test", ecdsa=True)
    rsa = pki.issue(ca, "dual.custom.test", ecdsa=False)
    edge.cli("domains-add", "dual.custom.test", "--app", "demo", *cert_args(write_pem(ecdsa)))
    out = edge.cli("domains-ssl", "dual.custom.test", *cert_args(write_pem(rsa)))
    assert "also serving the ECDSA" in out.stdout
    served(edge, "dual.custom.test", rsa.leaf_der, rsa_only=True)
    assert edge.handshake("dual.custom.test") == ecdsa.leaf_der
    assert edge.handshake("dual.custom.test", tls13=False) == ecdsa.leaf_der
    # openssl, TLS 1.3, offering RSA-PSS signatures only: the RSA certificate.
    require_tool("openssl")
    result = edge.openssl("-servername", "dual.custom.test", "-sigalgs", "rsa_pss_rsae_sha256")
    assert "Server public key is 2048 bit" in result.stdout, result.stdout + result.stderr
    result = edge.openssl("-servername", "dual.custom.test")
    assert "Server public key is 256 bit" in result.stdout


def _openssl_leaf(result) -> bytes:
    match = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", result.stdout, re.S)
    assert match, result.stdout + result.stderr
    return ssl.PEM_cert_to_DER_cert(match.group(0))


def test_mixed_case_and_trailing_dot_sni(edge: EdgeProcess, ca, write_pem) -> None:
    require_tool("openssl")
    pem = pki.issue(ca, "www.case.test")
    edge.cli("domains-add", "WWW.Case.Test.", "--app", "demo", *cert_args(write_pem(pem)))
    served(edge, "www.case.test", pem.leaf_der)
    for sni in ("WWW.CASE.TEST", "www.case.test.", "Www.Case.Test."):
        assert _openssl_leaf(edge.openssl("-servername", sni)) == pem.leaf_der, sni


def test_idna_name(edge: EdgeProcess, ca, write_pem) -> None:
    pem = pki.issue(ca, "xn--bcher-kva.test")
    out = edge.cli("domains-add", "bücher.test", "--app", "demo", *cert_args(write_pem(pem)))
    assert "xn--bcher-kva.test" in out.stdout
    served(edge, "xn--bcher-kva.test", pem.leaf_der)
    assert edge.handshake("bücher.test") == pem.leaf_der  # the stdlib sends the A-label


def test_domains_listing(edge: EdgeProcess, ca, write_pem) -> None:
    pem = pki.issue(ca, "list.custom.test")
    edge.cli("domains-add", "list.custom.test", "--app", "demo", *cert_args(write_pem(pem)))
    table = edge.cli("domains", "--app", "demo").stdout
    line = next(line for line in table.splitlines() if line.startswith("list.custom.test"))
    assert line.split()[:5] == ["list.custom.test", "demo", "custom", "ecdsa", line.split()[4]]
    assert line.split()[-1] == "ok"


@pytest.fixture(scope="module")
def strict_edge(tmp_path_factory, backend):
    process = EdgeProcess(tmp_path_factory.mktemp("strict"))
    text = process.config.read_text().replace('key = "dev/platform.key"', 'key = "dev/platform.key"\nstrict_sni = true')
    process.config.write_text(text)
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    yield process
    process.stop()


def test_strict_sni_refuses_unknown_and_absent(strict_edge: EdgeProcess) -> None:
    assert strict_edge.handshake("demo.edge.test") == platform_der(strict_edge)
    for name in ("unknown.example.org", None):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            strict_edge.handshake(name)
    require_tool("openssl")
    result = strict_edge.openssl("-servername", "unknown.example.org")
    assert "unrecognized name" in result.stderr, result.stderr
