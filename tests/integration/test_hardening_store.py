"""Issue #11, store side: each test reproduces one defect class against a real
edge process or the real CLI, on a real store (file, and etcd where the
defect is about coordination)."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme

from tests import pki
from tests.integration.conftest import EDGE, EdgeProcess, free_port, wait_for


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
    result = edge.cli("certs-import", "--app", "demo", str(tmp_path / "b.pem"), check=False)
    assert result.returncode == 3, result  # something was skipped (README: certs-import exit codes)
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


# --- 13: a rule checked then written under the store's lock ---------------------------------------
RACERS = 20


def _admin_node(root: Path, etcd: object | None = None) -> EdgeProcess:
    from tests.integration.etcd_server import etcd_node

    node = etcd_node(root, etcd) if etcd is not None else EdgeProcess(root)  # type: ignore[arg-type]
    port = free_port()
    node.config.write_text(node.config.read_text().replace('admin = ""', f'admin = "127.0.0.1:{port}"'))
    node.admin = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return node


def _admin(node: EdgeProcess, method: str, path: str, body: object | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(node.admin + path, data=data, method=method)  # type: ignore[attr-defined]
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _cli_race(node: EdgeProcess, commands: list[tuple[str, ...]]) -> list[subprocess.CompletedProcess[str]]:
    """Start every command at once, as separate `edge` processes; their results in order."""
    procs = [subprocess.Popen([EDGE, "--config", str(node.config), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    out = []
    for args, proc in zip(commands, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr))
    return out


def _consistent(node: EdgeProcess) -> None:
    """Every domain points at an app that exists, and `edge check` agrees."""
    apps = {a["app"] for a in json.loads(node.cli("apps", "--json").stdout)}
    rows = json.loads(node.cli("domains", "--json").stdout)
    assert all(r["app"] in apps for r in rows), [r for r in rows if r["app"] not in apps]
    check = node.cli("check", check=False)
    assert "missing app" not in check.stderr, check.stderr


def _race_cli(node: EdgeProcess, backend: str, tag: str) -> None:
    node.cli("apps-add", f"{tag}-a", "--backend", backend)
    node.cli("apps-add", f"{tag}-b", "--backend", backend)
    domain = f"contended.{tag}.example.test"
    results = _cli_race(node, [("domains-add", domain, "--app", f"{tag}-{'ab'[i % 2]}") for i in range(RACERS)])
    winners = [r for r in results if r.returncode == 0]
    assert len(winners) == 1, [r.stdout for r in winners]
    won = winners[0].args[-1]
    for loser in results:
        if loser.returncode != 0:
            assert "already attached to" in loser.stderr, loser.stderr
    rows = {r["domain"]: r["app"] for r in json.loads(node.cli("domains", "--json").stdout)}
    assert rows[domain] == won
    # apps-remove racing domains-add: never a domain left on a removed app.
    pairs: list[tuple[str, ...]] = []
    for i in range(RACERS // 2):
        node.cli("apps-add", f"{tag}-gone{i}", "--backend", backend)
        pairs += [("apps-remove", f"{tag}-gone{i}"), ("domains-add", f"d{i}.{tag}.example.test", "--app",
                                                       f"{tag}-gone{i}")]
    results = _cli_race(node, pairs)
    for remove, add in zip(results[::2], results[1::2], strict=True):
        assert (remove.returncode == 0) != (add.returncode == 0), (remove.stderr, add.stderr)
    _consistent(node)


def test_concurrent_cli_writes_file_store(tmp_path: Path, backend: str) -> None:
    node = EdgeProcess(tmp_path)
    _race_cli(node, backend, "f")


def test_concurrent_cli_writes_etcd(tmp_path: Path, backend: str, etcd: object) -> None:
    from tests.integration.etcd_server import etcd_node

    node = etcd_node(tmp_path / "node", etcd)  # type: ignore[arg-type]
    _race_cli(node, backend, "e")


def _race_admin(node: EdgeProcess, backend: str) -> None:
    node.start()
    try:
        for app in ("x", "y"):
            assert _admin(node, "POST", "/v1/apps", {"app": app, "backends": [backend]})[0] == 201
        domain = "contended.admin.example.test"
        with ThreadPoolExecutor(RACERS) as pool:
            results = list(pool.map(lambda i: _admin(node, "POST", "/v1/domains",
                                                     {"domain": domain, "app": "xy"[i % 2]}), range(RACERS)))
        assert [status for status, _ in results].count(201) == 1, results
        assert all("already attached" in body["error"] for status, body in results if status != 201)  # type: ignore[index]
        for i in range(RACERS // 2):
            assert _admin(node, "POST", "/v1/apps", {"app": f"gone{i}", "backends": [backend]})[0] == 201

        def pair(i: int) -> tuple[int, int]:
            with ThreadPoolExecutor(2) as inner:
                remove = inner.submit(_admin, node, "DELETE", f"/v1/apps/gone{i}")
                add = inner.submit(_admin, node, "POST", "/v1/domains",
                                   {"domain": f"d{i}.admin.example.test", "app": f"gone{i}"})
                return remove.result()[0], add.result()[0]

        with ThreadPoolExecutor(RACERS // 2) as pool:
            for remove, add in pool.map(pair, range(RACERS // 2)):
                assert (remove == 200) != (add == 201), (remove, add)
        _consistent(node)
    finally:
        node.stop()


def test_concurrent_admin_writes_file_store(tmp_path: Path, backend: str) -> None:
    _race_admin(_admin_node(tmp_path), backend)


def test_concurrent_admin_writes_etcd(tmp_path: Path, backend: str, etcd: object) -> None:
    _race_admin(_admin_node(tmp_path / "node", etcd), backend)


# --- 8: what is served follows every change of a bundle, not only of its leaf ------------------
def _sent_chain(node: EdgeProcess, name: str, *extra: str) -> int:
    """How many certificates edge sent in the handshake for ``name`` (0: no handshake)."""
    result = node.openssl("-servername", name, "-showcerts", *extra)
    return result.stdout.count("-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_completed_chain_of_the_same_leaf_is_served_at_once(edge: EdgeProcess, tmp_path: Path,
                                                            key_type: str) -> None:
    domain = f"chain-{key_type}.example.test"
    intermediate = trustme.CA().create_child_ca()
    issued = intermediate.issue_cert(
        domain, key_type=trustme.KeyType.ECDSA if key_type == "ecdsa" else trustme.KeyType.RSA)
    chain = [p.bytes() for p in issued.cert_chain_pems]
    assert len(chain) == 2  # leaf, intermediate
    (tmp_path / "leaf.pem").write_bytes(chain[0])
    (tmp_path / "full.pem").write_bytes(b"".join(chain))
    (tmp_path / "key.pem").write_bytes(issued.private_key_pem.bytes())
    rsa_client = ("-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256") if key_type == "rsa" else ()
    if key_type == "rsa":  # an ECDSA bundle beside it: both key types are part of what is served
        other = pki.issue(trustme.CA(), domain)
        (tmp_path / "ec.pem").write_bytes(other.cert)
        (tmp_path / "ec.key").write_bytes(other.key)
        edge.cli("domains-add", domain, "--app", "demo", "--cert", str(tmp_path / "ec.pem"),
                 "--key", str(tmp_path / "ec.key"))
        added = edge.cli("domains-ssl", domain, "--cert", str(tmp_path / "leaf.pem"),
                         "--key", str(tmp_path / "key.pem"))
    else:
        added = edge.cli("domains-add", domain, "--app", "demo", "--cert", str(tmp_path / "leaf.pem"),
                         "--key", str(tmp_path / "key.pem"))
    assert "no intermediate certificate came with it" in added.stderr, added.stderr
    wait_for(lambda: _sent_chain(edge, domain, *rsa_client) == 1)
    fixed = edge.cli("domains-ssl", domain, "--cert", str(tmp_path / "full.pem"), "--key", str(tmp_path / "key.pem"))
    assert "intermediate" not in fixed.stderr, fixed.stderr
    wait_for(lambda: _sent_chain(edge, domain, *rsa_client) == 2, timeout=3)
    # And back: the leaf alone again is served alone.
    edge.cli("domains-ssl", domain, "--cert", str(tmp_path / "leaf.pem"), "--key", str(tmp_path / "key.pem"))
    wait_for(lambda: _sent_chain(edge, domain, *rsa_client) == 1, timeout=3)


# --- 9: a damaged store entry keeps its last good version in service ------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"\x00 not a bundle \xff\n")
    elif how == "header":
        path.write_bytes(b"{broken json\n" + data.partition(b"\n")[2])
    else:  # "pem": the header intact, a line torn out of the certificate's base64
        lines = data.split(b"\n")
        start = lines.index(b"-----BEGIN CERTIFICATE-----")
        del lines[start + 2]
        path.write_bytes(b"\n".join(lines))


def _healthz(node: EdgeProcess) -> dict:
    with urllib.request.urlopen(node.admin + "/healthz", timeout=10) as response:  # type: ignore[attr-defined]
        return json.loads(response.read())


@pytest.mark.parametrize("how", ["garbage", "header", "pem"])
def test_damaged_entry_keeps_serving_its_last_good_version(tmp_path: Path, backend: str, ca: trustme.CA,
                                                           how: str) -> None:
    node = _admin_node(tmp_path)
    node.start()
    try:
        domain = "damaged.example.test"
        good = pki.issue(ca, domain)
        (tmp_path / "c.pem").write_bytes(good.cert)
        (tmp_path / "k.pem").write_bytes(good.key)
        node.cli("apps-add", "demo", "--backend", backend)
        node.cli("domains-add", domain, "--app", "demo", "--cert", str(tmp_path / "c.pem"),
                 "--key", str(tmp_path / "k.pem"))
        wait_for(lambda: node.handshake_or_empty(domain) == good.leaf_der)
        entry = tmp_path / "store" / "certs" / "custom-ecdsa" / f"{domain}.pem"
        _damage(entry, how)
        key = f"certs/custom-ecdsa/{domain}"
        # The watch saw it: still the good certificate, and /healthz names the
        # entry (a torn PEM is found when a handshake first builds its context).
        wait_for(lambda: node.handshake(domain) == good.leaf_der and key in _healthz(node)["corrupted"])
        for reload in ("sighup", "admin"):
            if reload == "sighup":
                before = node.log.count(b"store reloaded")
                node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                try:
                    wait_for(lambda before=before: node.log.count(b"store reloaded") > before)
                except AssertionError:
                    raise AssertionError(node.log.decode()[-3000:]) from None
            else:
                assert _admin(node, "POST", "/v1/reload")[0] == 200
            assert node.handshake(domain) == good.leaf_der, f"after a reload ({reload})"
            assert key in _healthz(node)["corrupted"]
        check = node.cli("check", check=False)
        assert check.returncode != 0 and f"store entry {key}:" in check.stderr, check.stderr
        # After a restart the host's local copy (issue #18) still holds the last
        # version the index accepted: a damaged header or a file that is not a
        # bundle keeps the good one in service. A PEM damaged inside (the header
        # parses) was accepted, so no earlier version is known: the name gets the
        # default certificate. Either way /healthz names the damaged entry.
        node.stop()
        node.log = bytearray()
        node.start()
        if how == "pem":
            assert node.handshake(domain) != good.leaf_der
        else:
            assert node.handshake(domain) == good.leaf_der
        wait_for(lambda: key in _healthz(node)["corrupted"])
    finally:
        node.stop()


# --- 17: a write killed midway leaves no hidden state ---------------------------------------------
_KILLED_AT = """
import os, signal, sys
calls = 0
real = os.{fn}
def dying(*args, **kwargs):
    global calls
    calls += 1
    if calls == {n}:
        os.kill(os.getpid(), signal.SIGKILL)  # the power cut, at exactly this step
    return real(*args, **kwargs)
os.{fn} = dying
from edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli_killed(node: EdgeProcess, fn: str, n: int, *args: str) -> None:
    """Run the real `edge` CLI and SIGKILL it at its ``n``-th call of ``os.<fn>``."""
    result = subprocess.run([sys.executable, "-c", _KILLED_AT.format(fn=fn, n=n), "--config", str(node.config),
                             *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)


def _temp_files(node: EdgeProcess) -> list[Path]:
    return [p for p in (node.root / "store").rglob(".tmp-*")]


def _no_hidden_certificate(node: EdgeProcess, domain: str, leaf: bytes) -> None:
    """A name served with its custom certificate is a listed domain."""
    listed = {r["domain"] for r in json.loads(node.cli("domains", "--json").stdout)}
    served = node.handshake_or_empty(domain) == leaf
    assert not (served and domain not in listed), f"{domain} is served its certificate but not listed"


def test_killed_writes_leave_no_hidden_certificate_and_no_debris(tmp_path: Path, backend: str,
                                                                 ca: trustme.CA) -> None:
    node = EdgeProcess(tmp_path)
    node.start()
    try:
        node.cli("apps-add", "demo", "--backend", backend)
        pem = pki.issue(ca, "torn.example.test", "gone.example.test")
        (tmp_path / "c.pem").write_bytes(pem.cert)
        (tmp_path / "k.pem").write_bytes(pem.key)
        upload = ("--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"))
        # domains-add with a certificate: two files, killed before the second rename.
        _cli_killed(node, "replace", 2, "domains-add", "torn.example.test", "--app", "demo", *upload)
        time.sleep(0.3)  # what the watch applies of it
        _no_hidden_certificate(node, "torn.example.test", pem.leaf_der)
        # domains-remove: killed at its first and at its second removal.
        for n in (1, 2):
            node.cli("domains-add", "gone.example.test", "--app", "demo", *upload)
            wait_for(lambda: node.handshake_or_empty("gone.example.test") == pem.leaf_der)
            _cli_killed(node, "unlink", n, "domains-remove", "gone.example.test")
            time.sleep(0.3)
            _no_hidden_certificate(node, "gone.example.test", pem.leaf_der)
        # What is left: `edge check` names it (the dead write's temporary file,
        # certificates of no domain), the next start removes the temporary file.
        debris = _temp_files(node)
        assert debris
        check = node.cli("check", check=False)
        assert check.returncode != 0 and str(debris[0]) in check.stderr and "interrupted write" in check.stderr
        assert "certificates of torn.example.test belong to no domain" in check.stderr, check.stderr
        node.stop()
        node.log = bytearray()
        node.start()
        wait_for(lambda: not _temp_files(node))
        # The log line follows the removal through a pipe: wait for it rather than race it.
        wait_for(lambda: b"left by an interrupted write" in node.log)
    finally:
        node.stop()


def test_check_names_certificates_of_no_domain(edge: EdgeProcess, ca: trustme.CA, tmp_path: Path) -> None:
    # What a removal killed midway left behind with an earlier edge (domain
    # first, certificates after), or a hand edit.
    pem = pki.issue(ca, "orphan.example.test")
    (tmp_path / "c.pem").write_bytes(pem.cert)
    (tmp_path / "k.pem").write_bytes(pem.key)
    edge.cli("domains-add", "orphan.example.test", "--app", "demo", "--cert", str(tmp_path / "c.pem"),
             "--key", str(tmp_path / "k.pem"))
    (edge.root / "store" / "domains" / "orphan.example.test.json").unlink()
    check = edge.cli("check", check=False)
    assert check.returncode != 0 and "certificates of orphan.example.test belong to no domain" in check.stderr
    edge.cli("domains-add", "orphan.example.test", "--app", "demo", "--cert", str(tmp_path / "c.pem"),
             "--key", str(tmp_path / "k.pem"))
    edge.cli("domains-remove", "orphan.example.test")
    assert "orphan.example.test" not in edge.cli("check", check=False).stderr


def test_concurrent_imports_attach_a_name_once(tmp_path: Path, backend: str, ca: trustme.CA) -> None:
    node = EdgeProcess(tmp_path)
    node.cli("apps-add", "imp-a", "--backend", backend)
    node.cli("apps-add", "imp-b", "--backend", backend)
    names = [f"n{i}.imported.example.test" for i in range(30)]
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    for name in names:
        pem = pki.issue(ca, name)
        (bundles / f"{name}.pem").write_bytes(pem.cert + pem.key)
    results = _cli_race(node, [("certs-import", "--app", f"imp-{'ab'[i % 2]}", str(bundles))
                               for i in range(RACERS)])
    owners = {r["domain"]: r["app"] for r in json.loads(node.cli("domains", "--json").stdout)}
    # Importing again into the app that holds a name updates its certificate;
    # an import into the other app must report the name skipped, never imported.
    for result in results:
        app = result.args[2]
        for name in names:
            if owners[name] != app:
                assert f"{name} ({bundles / name}.pem): attached to app" in result.stderr \
                    or f"{name}: attached to app {owners[name]}" in result.stderr, (name, app, result.stderr)


# --- 8, a sibling: a cached context that misses an input (the minimum TLS version) -------------
def _tls12_handshake(node: EdgeProcess, name: str) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection(("127.0.0.1", node.https_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=name):
            return True
    except (OSError, ssl.SSLError):
        return False


def test_raised_min_version_applies_to_cached_contexts(tmp_path: Path, backend: str, ca: trustme.CA) -> None:
    node = EdgeProcess(tmp_path)
    node.start()
    try:
        node.cli("apps-add", "demo", "--backend", backend)
        pem = pki.issue(ca, "v12.example.test")
        (tmp_path / "c.pem").write_bytes(pem.cert)
        (tmp_path / "k.pem").write_bytes(pem.key)
        node.cli("domains-add", "v12.example.test", "--app", "demo", "--cert", str(tmp_path / "c.pem"),
                 "--key", str(tmp_path / "k.pem"))
        wait_for(lambda: node.handshake_or_empty("v12.example.test") == pem.leaf_der)
        assert _tls12_handshake(node, "v12.example.test") and _tls12_handshake(node, "demo.edge.test")
        node.config.write_text(node.config.read_text() + '\n[tls]\nmin_version = "TLSv1.3"\n')
        node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: b"configuration reloaded" in node.log)
        for name in ("v12.example.test", "demo.edge.test", "unknown.example.test"):
            assert not _tls12_handshake(node, name), f"{name} still accepts TLS 1.2"
        assert node.handshake("v12.example.test") == pem.leaf_der  # TLS 1.3 still served
    finally:
        node.stop()


def test_check_names_stored_domains_the_rules_refuse(tmp_path: Path, backend: str) -> None:
    # Written by hand or by an edge from before the rule: `edge check` says so.
    node = EdgeProcess(tmp_path)
    node.cli("apps-add", "demo", "--backend", backend)
    node.cli("domains-add", "fine.example.test", "--app", "demo")
    for name in ("_.co.uk", "github.io", "x.edge.test"):
        (tmp_path / "store" / "domains" / f"{name}.json").write_text('{"app": "demo"}\n')
    check = node.cli("check", check=False)
    assert check.returncode != 0
    for name in ("*.co.uk", "github.io", "x.edge.test"):
        assert f"stored domain {name}:" in check.stderr, check.stderr
    assert "fine.example.test" not in check.stderr


# --- 18, in part: a certificate the watch delivered is served without the store ---------------
def test_watched_certificate_served_while_etcd_is_down(tmp_path: Path, backend: str, etcd: object,
                                                       ca: trustme.CA) -> None:
    from tests.integration.etcd_server import etcd_node

    node = etcd_node(tmp_path / "node", etcd)  # type: ignore[arg-type]
    node.cli("apps-add", "demo", "--backend", backend)
    node.start()
    try:
        pem = pki.issue(ca, "offline.example.test")
        (tmp_path / "c.pem").write_bytes(pem.cert)
        (tmp_path / "k.pem").write_bytes(pem.key)
        node.cli("domains-add", "offline.example.test", "--app", "demo", "--cert", str(tmp_path / "c.pem"),
                 "--key", str(tmp_path / "k.pem"))
        time.sleep(1)  # SPEC §6: applied within 100 ms (no handshake here: it would build the context)
        etcd.stop()  # type: ignore[attr-defined]
        # No handshake built its context before: it is built from what the watch delivered.
        assert node.handshake("offline.example.test") == pem.leaf_der
    finally:
        node.stop()
