"""Issue #11, store side: each test reproduces one defect class against a real
edge process or the real CLI, on a real store (file, and etcd where the
defect is about coordination)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trustme

from tests import pki
from tests.integration.conftest import EDGE, EdgeProcess


def fails_with(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode != 0, result.stdout
    assert result.stderr.startswith("edge: error: ") and words in result.stderr, result.stderr


# --- 19: public suffixes, and what counts as loopback -------------------------------------------
@pytest.mark.parametrize("domain", ["*.co.uk", "co.uk", "*.github.io", "github.io", "*.s3.amazonaws.com",
                                    "*.com", "CO.UK.", "*.xn--p1ai"])
def test_public_suffixes_are_refused(edge: EdgeProcess, domain: str) -> None:
    result = edge.cli("domains-add", domain, "--app", "demo", check=False)
    assert result.returncode != 0, f"{domain} was accepted: {result.stdout}"
    assert "public suffix" in result.stderr or "not a valid domain name" in result.stderr, result.stderr
    rows = json.loads(edge.cli("domains", "--json").stdout)
    assert not [r for r in rows if r["domain"].endswith(("co.uk", "github.io", "amazonaws.com"))]


def test_registrable_domains_under_suffixes_are_accepted(edge: EdgeProcess) -> None:
    for domain in ("shop.co.uk", "*.shop.co.uk", "someone.github.io"):
        edge.cli("domains-add", domain, "--app", "demo")
        edge.cli("domains-remove", domain)


def test_import_refuses_public_suffix_names(edge: EdgeProcess, ca: trustme.CA, tmp_path: Path) -> None:
    pem = pki.issue(ca, "*.co.uk", "imported.example.test")
    (tmp_path / "b.pem").write_bytes(pem.cert + pem.key)
    result = edge.cli("certs-import", "--app", "demo", str(tmp_path / "b.pem"))
    assert "*.co.uk" in result.stderr and "public suffix" in result.stderr, result.stderr
    domains = {r["domain"] for r in json.loads(edge.cli("domains", "--json").stdout)}
    assert "imported.example.test" in domains and "*.co.uk" not in domains


@pytest.mark.parametrize("host", ["127.evil.example", "127.0.0.1.nip.io", "localhost.evil.example"])
def test_admin_bound_to_a_name_needs_a_token(tmp_path: Path, host: str) -> None:
    node = EdgeProcess(tmp_path)
    node.config.write_text(node.config.read_text().replace('admin = ""', f'admin = "{host}:9090"'))
    fails_with(node.cli("check", check=False), "set admin_token")
    serve = subprocess.run([EDGE, "serve", "--config", str(node.config)], capture_output=True, text=True,
                           timeout=30)
    assert serve.returncode != 0 and "set admin_token" in serve.stderr


@pytest.mark.parametrize("host", ["127.0.0.2", "[::1]", "localhost"])
def test_admin_on_loopback_needs_no_token(tmp_path: Path, host: str) -> None:
    node = EdgeProcess(tmp_path)
    node.config.write_text(node.config.read_text().replace('admin = ""', f'admin = "{host}:9090"'))
    result = node.cli("check", check=False)
    assert "admin_token" not in result.stderr, result.stderr
