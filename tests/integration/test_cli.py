"""The management CLI: exit codes, one-line errors, what lands in the store."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests import pki
from tests.integration.conftest import EDGE, EdgeProcess


def fails_with(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode != 0
    assert result.stderr.startswith("edge: error: ") and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_apps_lifecycle(edge: EdgeProcess, backend: str) -> None:
    out = edge.cli("apps-add", "shop", "--backend", backend, "--backend", "127.0.0.1:9")
    assert out.stdout.startswith("app shop added: https://shop.edge.test")
    apps = json.loads(edge.cli("apps", "--json").stdout)
    shop = next(a for a in apps if a["app"] == "shop")
    assert shop["backends"] == [backend, "127.0.0.1:9"] and shop["force_https"] is True
    assert "updated" in edge.cli("apps-add", "shop", "--backend", backend).stdout
    edge.cli("domains-add", "shop.example.test", "--app", "shop")
    fails_with(edge.cli("apps-remove", "shop", check=False), "still has domains (shop.example.test)")
    edge.cli("domains-remove", "shop.example.test")
    assert edge.cli("apps-remove", "shop").stdout.strip() == "app shop removed"
    fails_with(edge.cli("apps-remove", "shop", check=False), "no app named 'shop'")


def test_bad_app_names_and_backends(edge: EdgeProcess) -> None:
    fails_with(edge.cli("apps-add", "Bad_Name", "--backend", "127.0.0.1:1", check=False), "app name 'Bad_Name'")
    fails_with(edge.cli("apps-add", "ok", "--backend", "nohost", check=False), "is not host:port")


def test_domain_rules(edge: EdgeProcess, backend: str) -> None:
    edge.cli("apps-add", "other", "--backend", backend)
    fails_with(edge.cli("domains-add", "x.edge.test", "--app", "demo", check=False), "under the platform domain")
    fails_with(edge.cli("domains-add", "edge.test", "--app", "demo", check=False), "under the platform domain")
    fails_with(edge.cli("domains-add", "bad..name", "--app", "demo", check=False), "not a valid domain name")
    fails_with(edge.cli("domains-add", "owned.example.test", "--app", "nosuch", check=False), "no app named 'nosuch'")
    edge.cli("domains-add", "owned.example.test", "--app", "demo")
    fails_with(edge.cli("domains-add", "owned.example.test", "--app", "other", check=False),
               "already attached to app demo")
    fails_with(edge.cli("domains-ssl", "nosuch.example.test", "--disable", check=False),
               "no domain nosuch.example.test")
    fails_with(edge.cli("domains-remove", "nosuch.example.test", check=False), "no domain")
    out = edge.cli("domains-add", "bare.example.test", "--app", "demo")
    assert "has no certificate" in out.stderr
    rows = json.loads(edge.cli("domains", "--json", "--app", "demo").stdout)
    bare = next(r for r in rows if r["domain"] == "bare.example.test")
    assert bare["serving"] == "default" and bare["status"] == "no certificate"


def test_csr_writes_private_key_0600_and_a_matching_csr(tmp_path: Path) -> None:
    for key_type, expected in (("rsa2048", rsa.RSAPublicKey), ("ec256", ec.EllipticCurvePublicKey)):
        out = tmp_path / key_type
        out.mkdir()
        result = subprocess.run([EDGE, "csr", "www.example.com", "--key-type", key_type,
                                 "--subject", "/C=FR/O=Example", "--out-dir", str(out)],
                                capture_output=True, text=True, check=True)
        assert "wrote" in result.stdout
        key_path = out / "www.example.com.key"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        csr = x509.load_pem_x509_csr((out / "www.example.com.csr").read_bytes())
        assert csr.is_signature_valid
        assert isinstance(csr.public_key(), expected)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["www.example.com"]
        assert "O=Example" in csr.subject.rfc4514_string()
        # Never overwrite a key that may be in use.
        again = subprocess.run([EDGE, "csr", "www.example.com", "--out-dir", str(out)], capture_output=True, text=True)
        assert again.returncode != 0 and "exists" in again.stderr
    # The openssl toolchain reads what we wrote.
    subprocess.run(["openssl", "req", "-in", str(tmp_path / "ec256" / "www.example.com.csr"), "-noout", "-verify"],
                   check=True, capture_output=True)


def test_check_reports_config_errors_with_line(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[server]\nhttps = ["127.0.0.1:0"]\n\n[proxy]\nidle_timeout = -1\n')
    result = subprocess.run([EDGE, "check", "--config", str(config)], capture_output=True, text=True)
    fails_with(result, f"{config}:5: [proxy] idle_timeout: must be a positive number of seconds")


def test_check_passes_on_a_good_store(ca, tmp_path: Path) -> None:
    # A store of its own: the module's shared one holds what other tests damage on purpose.
    node = EdgeProcess(tmp_path / "node")
    pem = pki.issue(ca, "checked.example.test")
    (tmp_path / "c").write_bytes(pem.cert)
    (tmp_path / "k").write_bytes(pem.key)
    node.cli("apps-add", "demo", "--backend", "127.0.0.1:9")
    node.cli("domains-add", "checked.example.test", "--app", "demo", "--cert", str(tmp_path / "c"),
             "--key", str(tmp_path / "k"))
    result = node.cli("check", check=False)
    assert result.returncode == 0, result.stderr
    assert "checked.example.test" not in result.stderr


def test_serve_refuses_bad_config_with_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[store]\nbackend = "zookeeper"\n')
    result = subprocess.run([EDGE, "serve", "--config", str(config)], capture_output=True, text=True, timeout=30)
    fails_with(result, ':2: [store] backend: expected "file" or "etcd"')


def test_serve_reports_port_in_use(tmp_path: Path, edge: EdgeProcess) -> None:
    proc = EdgeProcess(tmp_path / "second")
    proc.config.write_text(proc.config.read_text().replace(
        'https = ["127.0.0.1:0"]', f'https = ["127.0.0.1:{edge.https_port}"]'))
    result = subprocess.run([EDGE, "serve", "--config", str(proc.config)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    # serve logs as it starts; the error is its last line.
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"edge: error: cannot listen on 127.0.0.1:{edge.https_port}: Address already in use"


def test_apps_add_prints_a_url_that_works(tmp_path: Path, backend: str) -> None:
    # The URL printed must be one to paste into curl: with the port unless it is 443.
    process = EdgeProcess(tmp_path / "dev")
    process.config.write_text(process.config.read_text().replace('https = ["127.0.0.1:0"]',
                                                                 'https = ["127.0.0.1:8443"]'))
    out = process.cli("apps-add", "web", "--backend", backend).stdout
    assert out.startswith("app web added: https://web.edge.test:8443 -> "), out
    production = EdgeProcess(tmp_path / "prod")
    production.config.write_text(production.config.read_text().replace('https = ["127.0.0.1:0"]',
                                                                       'https = [":443"]'))
    out = production.cli("apps-add", "web", "--backend", backend).stdout
    assert out.startswith("app web added: https://web.edge.test -> "), out


def test_closed_stdout_is_quiet(tmp_path: Path, backend: str) -> None:
    # `edge domains --json | head`: the reader goes away; no traceback, the exit status of a SIGPIPE.
    process = EdgeProcess(tmp_path)
    process.cli("apps-add", "web", "--backend", backend)
    for command in (["domains", "--json"], ["apps"], ["apps-add", "web", "--backend", backend]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # closed before edge writes a byte: every write fails with EPIPE
        try:
            result = subprocess.run([EDGE, "--config", str(process.config), *command], stdout=write_end,
                                    stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert result.returncode == 141, (command, result.returncode, result.stderr)
        assert result.stderr == "", (command, result.stderr)
