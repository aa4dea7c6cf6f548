"""The admin API against browsers: cross-site requests (CSRF) and DNS rebinding.

The default admin listens on loopback without a token, so the only thing that
stands between a web page the operator visits and the store is what the admin
accepts from a browser. Raw HTTP (http.client) on a real edge, so the exact
Host, Origin and Content-Type headers a browser would send are the ones sent.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import EdgeProcess, free_port


@pytest.fixture(scope="module")
def open_admin(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[EdgeProcess]:
    """The default shape: loopback admin, no token, one extra name allowed."""
    process = EdgeProcess(tmp_path_factory.mktemp("admin-guard"))
    process.admin_port = free_port()  # type: ignore[attr-defined]
    process.config.write_text(process.config.read_text().replace(
        'admin = ""', f'admin = "127.0.0.1:{process.admin_port}"\n'  # type: ignore[attr-defined]
                      'admin_hosts = ["edge-admin.internal"]'))
    process.start()
    yield process
    process.stop()


def raw(edge: EdgeProcess, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (Host included: skip_host)."""
    port = edge.admin_port  # type: ignore[attr-defined]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        all_headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
        if body is not None:
            all_headers.setdefault("Content-Length", str(len(body)))
        for name, value in all_headers.items():
            if value is not None:
                connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def app_names(edge: EdgeProcess) -> set[str]:
    return {row["app"] for row in json.loads(edge.cli("apps", "--json").stdout)}


def test_text_plain_body_is_refused(open_admin: EdgeProcess, backend: str) -> None:
    # What an HTML form or a no-cors fetch() can send cross-site without a preflight.
    body = json.dumps({"app": "csrf-plain", "backends": [backend]}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, answer = raw(open_admin, "POST", "/v1/apps", body, {"Content-Type": content_type})
        assert status == 415 and b"application/json" in answer, (content_type, status, answer)
    status, _, _ = raw(open_admin, "POST", "/v1/apps", body, {})  # no Content-Type at all
    assert status == 415
    # A form can POST to /v1/reload too (an empty form body still has a Content-Type).
    status, _, _ = raw(open_admin, "POST", "/v1/reload", b"", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415
    assert "csrf-plain" not in app_names(open_admin)
    # The API's own clients keep working.
    status, _, answer = raw(open_admin, "POST", "/v1/apps", body, {"Content-Type": "application/json"})
    assert status == 201, answer
    status, _, _ = raw(open_admin, "POST", "/v1/reload")  # no body: nothing to check
    assert status == 200


def test_foreign_origin_is_refused(open_admin: EdgeProcess, backend: str) -> None:
    port = open_admin.admin_port  # type: ignore[attr-defined]
    body = json.dumps({"app": "csrf-origin", "backends": [backend]}).encode()
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", "http://localhost"):
        status, headers, _ = raw(open_admin, "POST", "/v1/apps", body,
                                 {"Content-Type": "application/json", "Origin": origin})
        assert status == 403, (origin, status)
        assert not any(h.startswith("access-control-") for h in headers)
        status, _, _ = raw(open_admin, "GET", "/v1/apps", headers={"Origin": origin})
        assert status == 403, origin
    assert "csrf-origin" not in app_names(open_admin)
    # The admin's own origin (a page it served, or a tool that sends Origin) is fine.
    status, headers, _ = raw(open_admin, "GET", "/v1/apps", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and not any(h.startswith("access-control-") for h in headers)


@pytest.mark.parametrize("path", ["/v1/apps", "/metrics", "/healthz", "/openapi.json", "/no-such-route"])
def test_rebinding_host_is_refused(open_admin: EdgeProcess, path: str) -> None:
    port = open_admin.admin_port  # type: ignore[attr-defined]
    # A rebinding page at evil.example:PORT whose name now resolves to 127.0.0.1.
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}",
                 f"127.0.0.1:{port + 1}", f"[::1]:{port}", f"10.0.0.1:{port}"):
        status, _, answer = raw(open_admin, "GET", path, headers={"Host": host})
        assert status == 421 and b"Host" in answer, (host, status, answer)


def test_own_addresses_and_configured_names_are_accepted(open_admin: EdgeProcess) -> None:
    port = open_admin.admin_port  # type: ignore[attr-defined]
    # A bare address (no port) is what health checkers send; no browser aiming
    # at this port sends it.
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"LOCALHOST:{port}", "localhost",
                 "edge-admin.internal", f"edge-admin.internal:{port}"):
        status, _, answer = raw(open_admin, "GET", "/healthz", headers={"Host": host})
        assert status == 200, (host, answer)


def test_malformed_json_is_a_400_not_a_500(open_admin: EdgeProcess) -> None:
    for body in (b"{not json", b"\xff\xfe", b"[" * 100_000, b"[]", b'{"app": "x", "backends": "1.2.3.4:5"}'):
        status, _, answer = raw(open_admin, "POST", "/v1/apps", body, {"Content-Type": "application/json"})
        assert status == 400, (body[:20], status, answer)
        assert "error" in json.loads(answer)


def test_ipv6_loopback_admin(tmp_path: Path) -> None:
    # Bound to [::1]: its own address is "[::1]:PORT"; localhost still works, 127.0.0.1 is another address.
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 here")
    process = EdgeProcess(tmp_path)
    port = free_port()
    process.config.write_text(process.config.read_text().replace('admin = ""', f'admin = "[::1]:{port}"'))
    process.start()
    try:
        def status(host: str) -> int:
            connection = http.client.HTTPConnection("::1", port, timeout=10)
            try:
                connection.request("GET", "/healthz", headers={"Host": host})
                return connection.getresponse().status
            finally:
                connection.close()

        assert status(f"[::1]:{port}") == 200 and status(f"localhost:{port}") == 200
        assert status(f"127.0.0.1:{port}") == 421 and status(f"evil.example:{port}") == 421
    finally:
        process.stop()
