"""The listener's security settings, the default certificate, a tiny context cache."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from tests import pki
from tests.integration.conftest import EdgeProcess, require_tool, wait_for


def _client(**settings: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for name, value in settings.items():
        if name == "ciphers":
            ctx.set_ciphers(str(value))
        elif name == "alpn":
            ctx.set_alpn_protocols(value)  # type: ignore[arg-type]
        else:
            setattr(ctx, name, value)
    return ctx


def _connect(edge: EdgeProcess, ctx: ssl.SSLContext, name: str = "demo.edge.test") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", edge.https_port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname=name)


def test_tls13_and_alpn_http11(edge: EdgeProcess) -> None:
    with _connect(edge, _client(alpn=["h2", "http/1.1"])) as tls:
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "h2"  # [proxy] http2 = true by default
    with _connect(edge, _client(alpn=["http/1.1"])) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"


def test_tls12_gets_forward_secret_aead(edge: EdgeProcess) -> None:
    with _connect(edge, _client(maximum_version=ssl.TLSVersion.TLSv1_2)) as tls:
        assert tls.version() == "TLSv1.2"
        name = tls.cipher()[0]
        assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)


def test_cbc_only_client_refused(edge: EdgeProcess) -> None:
    ctx = _client(maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA:AES128-SHA")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _connect(edge, ctx)


def test_tls11_refused(edge: EdgeProcess) -> None:
    require_tool("openssl")
    result = edge.openssl("-servername", "demo.edge.test", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    # No TLS 1.1 session; the client is told why (RFC 8446 §6.2: protocol_version),
    # though uvloop, like asyncio (CPython issue 98078), drops the alert: edge sends it.
    assert "Cipher is (NONE)" in result.stdout, result.stdout
    assert "alert protocol version" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def custom_default_edge(tmp_path_factory: pytest.TempPathFactory, backend: str, ca: trustme.CA):
    root = tmp_path_factory.mktemp("default")
    default = pki.issue(ca, "fallback.example.org")
    (root / "default.crt").write_bytes(default.cert)
    (root / "default.key").write_bytes(default.key)
    process = EdgeProcess(root, extra_config='[tls]\ndefault_cert = "default.crt"\n'
                                              'default_key = "default.key"\ncontext_cache_size = 1\n')
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    yield process, default
    process.stop()


def test_configured_default_certificate(custom_default_edge) -> None:
    edge, default = custom_default_edge
    assert edge.handshake("unknown.example.org") == default.leaf_der
    assert edge.handshake(None) == default.leaf_der
    platform = edge.handshake("demo.edge.test")
    assert platform != default.leaf_der
    # SNI says the platform, Host an unknown name served with another certificate: 421.
    result = edge.curl(f"https://demo.edge.test:{edge.https_port}/", "-k", "-H", "Host: unknown.example.org",
                       "-o", "/dev/null", "-w", "%{http_code}")
    assert result.stdout == "421"


def test_cache_of_one_context_still_serves_every_name(custom_default_edge, ca: trustme.CA,
                                                      tmp_path: Path) -> None:
    edge, _ = custom_default_edge
    pems = {}
    for i in range(4):
        host = f"n{i}.cache.test"
        pems[host] = pki.issue(ca, host)
        (tmp_path / f"{i}.crt").write_bytes(pems[host].cert)
        (tmp_path / f"{i}.key").write_bytes(pems[host].key)
        edge.cli("domains-add", host, "--app", "demo", "--cert", str(tmp_path / f"{i}.crt"),
                 "--key", str(tmp_path / f"{i}.key"))
    for host, pem in pems.items():
        wait_for(lambda host=host, pem=pem: edge.handshake_or_empty(host) == pem.leaf_der)
    # Round-robin over more names than the cache holds: every handshake is a cold build.
    for _ in range(3):
        for host, pem in pems.items():
            assert edge.handshake(host) == pem.leaf_der


def _tickets(edge: EdgeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """openssl s_client sending one request and reading to the end, its TLS
    messages traced (-msg): the NewSessionTicket messages it received are listed."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{edge.https_port}", "-servername", "demo.edge.test",
         "-tls1_3", "-msg", "-ign_eof", *args],
        input="GET / HTTP/1.1\r\nHost: demo.edge.test\r\nConnection: close\r\n\r\n",
        capture_output=True, text=True, timeout=10,
    )


def test_one_session_ticket_per_handshake_and_it_resumes(edge: EdgeProcess, tmp_path: Path) -> None:
    """One TLS 1.3 ticket after a full handshake (OpenSSL's default is two,
    RFC 8446 §4.6.1 leaves it to the server), one after a resumption, and the
    ticket resumes: a client connecting again always holds a fresh one."""
    require_tool("openssl")
    session = tmp_path / "session.pem"
    full = _tickets(edge, "-sess_out", str(session))
    assert "HTTP/1.1 200" in full.stdout, full.stdout[-2000:]
    assert "New, TLSv1.3" in full.stdout
    assert full.stdout.count("NewSessionTicket") == 1, full.stdout
    resumed = _tickets(edge, "-sess_in", str(session), "-sess_out", str(session))
    assert "Reused, TLSv1.3" in resumed.stdout and "HTTP/1.1 200" in resumed.stdout, resumed.stdout[-2000:]
    assert resumed.stdout.count("NewSessionTicket") == 1, resumed.stdout
    again = _tickets(edge, "-sess_in", str(session))
    assert "Reused, TLSv1.3" in again.stdout  # the ticket from the resumed connection resumes too
