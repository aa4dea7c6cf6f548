"""`edge certs-import` from HAProxy-style bundles, and correctness at a scale
CI can afford: 20k names, a context cache far smaller, every lookup cold."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests import pki
from tests.integration.conftest import EdgeProcess, wait_for


def test_import_files_directories_and_crt_lists(edge: EdgeProcess, ca: trustme.CA, tmp_path: Path) -> None:
    crt_dir = tmp_path / "certs"
    crt_dir.mkdir()
    good = {}
    for name in ("a.import.test", "b.import.test", "*.wild.import.test"):
        pem = pki.issue(ca, name)
        good[name] = pem
        (crt_dir / (name.replace("*", "_") + ".pem")).write_bytes(pem.key + pem.cert)  # key first, as some tools do
    (crt_dir / "broken.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (crt_dir / "a.import.test.pem.ocsp").write_bytes(b"\x30\x00")  # a companion file HAProxy skips too
    listed = pki.issue(ca, "c.import.test")
    (tmp_path / "c.pem").write_bytes(listed.cert + listed.key)
    (tmp_path / "crt-list.txt").write_text(f"# a HAProxy crt-list\n{tmp_path / 'c.pem'} [alpn h2] c.import.test\n")
    result = edge.cli("certs-import", "--app", "demo", str(crt_dir), str(tmp_path / "crt-list.txt"), check=False)
    assert result.returncode == 3, result.stderr  # the rest imported, but a script must notice the skipped file
    assert "imported 4 names from 4 of 5 files into app demo; 1 files skipped" in result.stdout
    assert "broken.pem" in result.stderr and "imported 5/5 files" in result.stderr
    wait_for(lambda: edge.handshake_or_empty("a.import.test") == good["a.import.test"].leaf_der)
    assert edge.handshake("b.import.test") == good["b.import.test"].leaf_der
    assert edge.handshake("x.wild.import.test") == good["*.wild.import.test"].leaf_der
    assert edge.handshake("c.import.test") == listed.leaf_der
    rows = {r["domain"]: r for r in json.loads(edge.cli("domains", "--json", "--app", "demo").stdout)}
    assert rows["a.import.test"]["serving"] == "custom" and rows["*.wild.import.test"]["app"] == "demo"


def _many(directory: Path, count: int) -> dict[str, int]:
    """``count`` combined PEM bundles sharing one key; name -> serial number."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scale test CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    now = dt.datetime.now(dt.UTC)
    serials = {}
    for i in range(count):
        name = f"s{i}.scale.test"
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key_pem)
        serials[name] = serial
    return serials


@pytest.fixture(scope="module")
def scale_edge(tmp_path_factory: pytest.TempPathFactory, backend: str):
    root = tmp_path_factory.mktemp("scale")
    bundles_dir = root / "bundles"
    bundles_dir.mkdir()
    serials = _many(bundles_dir, 20_000)
    process = EdgeProcess(root / "edge", extra_config="[tls]\ncontext_cache_size = 100\n")
    process.cli("apps-add", "demo", "--backend", backend)
    result = process.cli("certs-import", "--app", "demo", str(bundles_dir))
    assert "imported 20000 names from 20000 of 20000 files" in result.stdout
    process.start()
    yield process, serials
    process.stop()


def test_cold_lookups_among_20k_names(scale_edge) -> None:
    edge, serials = scale_edge
    sample = random.Random(7).sample(sorted(serials), 300)
    for name in sample:
        cert = x509.load_der_x509_certificate(edge.handshake(name))
        assert cert.serial_number == serials[name], name
    # A name that is not in the store still gets the default certificate.
    assert edge.handshake("nope.scale.test") == edge.handshake("unknown.example.org")


def test_serving_starts_before_the_store_is_loaded(scale_edge) -> None:
    """A restart at scale: names are answered right away, each correctly,
    while the index still loads in the background (SPEC §2: any name, cold or warm)."""
    edge, serials = scale_edge
    edge.stop()
    shutil.rmtree(edge.root / "index")  # no local copy on disk: the store is read
    edge.log.clear()
    edge.start()
    sample = random.Random(11).sample(sorted(serials), 60)
    during = 0
    for name in sample:
        loaded = b"store loaded" in edge.log
        cert = x509.load_der_x509_certificate(edge.handshake(name))
        assert cert.serial_number == serials[name], name
        during += not loaded
    wait_for(lambda: b"store loaded: 1 apps, 20000 domains, 20000 names" in edge.log, timeout=60)
    print(f"{during} of {len(sample)} names answered before the load finished")
    assert during > 0  # the path under test was taken (20k names take over a second to load)
    # Names not in the store: the default certificate, during the load as after it.
    assert edge.handshake("nope.scale.test") == edge.handshake("unknown.example.org")
    assert edge.status("s1.scale.test") == 200


def test_restart_serves_every_name_from_the_local_copy(scale_edge) -> None:
    """A restart with the store unchanged (issue #13): the index comes from the
    host's local copy, not from reading every store entry again."""
    edge, serials = scale_edge
    wait_for(lambda: b"store loaded" in edge.log or b"store reloaded" in edge.log, timeout=60)
    edge.stop()
    edge.log.clear()
    started = time.monotonic()
    edge.start()
    sample = random.Random(12).sample(sorted(serials), 60)
    for name in sample:
        assert x509.load_der_x509_certificate(edge.handshake(name)).serial_number == serials[name], name
    wait_for(lambda: b"local copy loaded: 1 apps, 20000 domains, 20000 names" in edge.log, timeout=30)
    took = float(re.search(rb"local copy loaded: .* in ([\d.]+) s", edge.log).group(1))  # type: ignore[union-attr]
    print(f"every name in the index {time.monotonic() - started:.2f} s after start (copy read in {took:.2f} s)")
    wait_for(lambda: b"store reloaded: 1 apps, 20000 domains" in edge.log, timeout=60)  # caught up
    # Catching up read no file again: the copy holds the stamp of each one it read.
    assert re.search(rb"store reloaded: .*damaged entries \(0 read\)", edge.log), edge.log.decode()[-2000:]
