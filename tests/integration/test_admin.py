"""The admin API over real HTTP, and metrics moving with real TLS traffic."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trustme

from edge.admin.app import OPENAPI
from tests import pki
from tests.integration.conftest import EdgeProcess, free_port, wait_for

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def admin_edge(tmp_path_factory: pytest.TempPathFactory, backend: str):
    process = EdgeProcess(tmp_path_factory.mktemp("admin"))
    port = free_port()
    process.config.write_text(process.config.read_text().replace(
        'admin = ""', f'admin = "127.0.0.1:{port}"\nadmin_token = "{TOKEN}"'))
    process.admin = f"http://127.0.0.1:{port}"
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    yield process
    process.stop()


def call(edge: EdgeProcess, method: str, path: str, body: object | None = None,
         token: str | None = TOKEN) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(edge.admin + path, data=data, method=method)  # type: ignore[attr-defined]
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            status = response.status
            kind = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in kind else raw.decode()


def test_healthz_needs_no_token(admin_edge: EdgeProcess) -> None:
    status, body = call(admin_edge, "GET", "/healthz", token=None)
    assert status == 200 and body["status"] == "ok"  # type: ignore[index]
    assert body["https"] == [f"127.0.0.1:{admin_edge.https_port}"]  # type: ignore[index]
    # A few entries load at once; at scale "loading" lasts while names are fetched on demand.
    wait_for(lambda: call(admin_edge, "GET", "/healthz", token=None)[1]["store"] == "loaded")  # type: ignore[index]


def test_token_required(admin_edge: EdgeProcess) -> None:
    for token in (None, "wrong"):
        status, body = call(admin_edge, "GET", "/v1/apps", token=token)
        assert status == 401 and "bearer token" in body["error"]  # type: ignore[index]


def test_apps_and_domains_routes(admin_edge: EdgeProcess, backend: str, ca: trustme.CA) -> None:
    status, body = call(admin_edge, "POST", "/v1/apps", {"app": "api-made", "backends": [backend]})
    assert status == 201 and body["message"].startswith("app api-made added")  # type: ignore[index]
    status, body = call(admin_edge, "POST", "/v1/apps", {"app": "Bad_Name", "backends": [backend]})
    assert status == 400 and "app name 'Bad_Name' is invalid" in body["error"]  # type: ignore[index]
    status, apps = call(admin_edge, "GET", "/v1/apps")
    assert {a["app"] for a in apps} >= {"demo", "api-made"}  # type: ignore[union-attr]

    pem = pki.issue(ca, "www.api.test")
    other = pki.issue(ca, "www.api.test")
    status, body = call(admin_edge, "POST", "/v1/domains", {"domain": "www.api.test", "app": "api-made",
                                                             "cert": pem.cert.decode(), "key": pem.key.decode()})
    assert status == 201, body
    wait_for(lambda: admin_edge.handshake_or_empty("www.api.test") == pem.leaf_der)
    # The same refusal as the CLI, and nothing changes.
    status, body = call(admin_edge, "PUT", "/v1/domains/www.api.test/certificate",
                        {"cert": pem.cert.decode(), "key": other.key.decode()})
    assert status == 400 and "the private key does not match the certificate" in body["error"]  # type: ignore[index]
    assert admin_edge.handshake("www.api.test") == pem.leaf_der
    status, body = call(admin_edge, "PUT", "/v1/domains/www.api.test/certificate",
                        {"cert": other.cert.decode(), "key": other.key.decode()})
    assert status == 200, body
    wait_for(lambda: admin_edge.handshake_or_empty("www.api.test") == other.leaf_der)
    status, rows = call(admin_edge, "GET", "/v1/domains?app=api-made")
    assert rows == [r for r in rows if r["app"] == "api-made"] and rows[0]["serving"] == "custom"  # type: ignore
    status, body = call(admin_edge, "DELETE", "/v1/domains/www.api.test/certificate")
    assert status == 200
    status, body = call(admin_edge, "DELETE", "/v1/domains/www.api.test")
    assert status == 200
    status, body = call(admin_edge, "DELETE", "/v1/domains/www.api.test")
    assert status == 404 and "no domain www.api.test" in body["error"]  # type: ignore[index]
    status, body = call(admin_edge, "DELETE", "/v1/apps/api-made")
    assert status == 200
    status, body = call(admin_edge, "DELETE", "/v1/apps/api-made")
    assert status == 404


def test_bad_bodies(admin_edge: EdgeProcess) -> None:
    request = urllib.request.Request(admin_edge.admin + "/v1/apps", data=b"{not json", method="POST")  # type: ignore[attr-defined]
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")  # urllib's default (a form) is refused: 415
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=10)
    assert exc.value.code == 400 and b"not JSON" in exc.value.read()
    status, body = call(admin_edge, "POST", "/v1/domains", {"domain": "x.api.test", "app": "demo", "cert": "x"})
    assert status == 400 and '"cert" and "key"' in body["error"]  # type: ignore[index]


def test_reload(admin_edge: EdgeProcess) -> None:
    status, body = call(admin_edge, "POST", "/v1/reload")
    assert status == 200 and body["reloads"] >= 2  # type: ignore[index]


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_with_traffic(admin_edge: EdgeProcess) -> None:
    status, before = call(admin_edge, "GET", "/metrics")
    assert status == 200 and isinstance(before, str)
    for _ in range(5):
        admin_edge.curl(f"https://demo.edge.test:{admin_edge.https_port}/", "-k", "-o", "/dev/null")
    admin_edge.curl(f"https://nobody.edge.test:{admin_edge.https_port}/", "-k", "-o", "/dev/null")
    admin_edge.handshake("unknown.example.org")
    status, after = call(admin_edge, "GET", "/metrics")
    assert isinstance(after, str)
    ok = 'edge_handshakes_total{result="ok",source="platform",version="TLSv1.3"}'
    assert _metric(after, ok) >= _metric(before, ok) + 6
    assert _metric(after, 'edge_requests_total{code="2xx"}') >= _metric(before, 'edge_requests_total{code="2xx"}') + 5
    assert _metric(after, 'edge_requests_total{code="4xx"}') >= _metric(before, 'edge_requests_total{code="4xx"}') + 1
    assert _metric(after, "edge_unknown_sni_total") >= _metric(before, "edge_unknown_sni_total") + 1
    assert _metric(after, "edge_request_duration_seconds_count") >= 6
    assert _metric(after, "edge_handshake_duration_seconds_count") >= 7
    assert "edge_tls_context_cache_size" in after and "edge_store_sync_lag_seconds" in after
    assert "\nedge_store_loading 0.0\n" in after  # the small store finished loading long ago
    assert 'edge_certificates{source="platform"} 1.0' in after
    # No label carries a domain name.
    assert "demo.edge.test" not in after and "unknown.example.org" not in after


def test_every_metric_moves(admin_edge: EdgeProcess, ca: trustme.CA, backend: str) -> None:
    """The rest of SPEC §8 over real traffic: certificates, expiry, cache, upstream
    errors, open connections, reloads, store sync lag."""
    import socket as socket_mod
    import ssl

    _, before = call(admin_edge, "GET", "/metrics")
    assert isinstance(before, str)
    pem = pki.issue(ca, "metrics.api.test")
    call(admin_edge, "POST", "/v1/domains", {"domain": "metrics.api.test", "app": "demo",
                                             "cert": pem.cert.decode(), "key": pem.key.decode()})
    wait_for(lambda: admin_edge.handshake_or_empty("metrics.api.test") == pem.leaf_der)
    assert admin_edge.handshake("metrics.api.test") == pem.leaf_der  # served from the context cache
    with socket_mod.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    call(admin_edge, "POST", "/v1/apps", {"app": "dead", "backends": [f"127.0.0.1:{dead}"]})
    admin_edge.wait_routed("dead.edge.test")
    call(admin_edge, "POST", "/v1/reload")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    held = ctx.wrap_socket(socket_mod.create_connection(("127.0.0.1", admin_edge.https_port)),
                           server_hostname="demo.edge.test")
    try:
        _, after = call(admin_edge, "GET", "/metrics")
    finally:
        held.close()
    assert isinstance(after, str)

    def moved(line_start: str, by: float = 1) -> bool:
        return _metric(after, line_start) >= _metric(before, line_start) + by

    assert moved('edge_certificates{source="custom"}')
    assert _metric(after, 'edge_certificate_nearest_expiry_days{source="custom"}') > 0
    assert 'edge_certificates_expiring{source="custom",within_days="30"}' in after
    assert moved("edge_tls_context_cache_misses_total") and moved("edge_tls_context_cache_size")
    assert moved("edge_tls_context_cache_hits_total")
    assert moved('edge_upstream_errors_total{kind="refused"}')
    assert moved("edge_reloads_total")
    assert _metric(after, "edge_open_connections") >= 1
    assert 0 <= _metric(after, "edge_store_sync_lag_seconds") < 5
    assert 'edge_handshakes_total{result="ok",source="custom",version="TLSv1.3"}' in after


def test_openapi_matches_routes(admin_edge: EdgeProcess) -> None:
    status, served = call(admin_edge, "GET", "/openapi.json")
    assert status == 200 and served == json.loads(OPENAPI.read_text())
    from prometheus_client.registry import CollectorRegistry

    from edge.admin.app import make_app

    app = make_app(None, None, CollectorRegistry(), "", ())  # type: ignore[arg-type]
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(m, p) for p, ops in served["paths"].items() for m in ops}  # type: ignore[index]
    assert routes == documented


def test_refuses_public_admin_without_token(tmp_path: Path) -> None:
    process = EdgeProcess(tmp_path)
    process.config.write_text(process.config.read_text().replace('admin = ""', 'admin = "0.0.0.0:9999"'))
    result = process.cli("check", check=False)
    assert result.returncode != 0 and "set admin_token (or EDGE_ADMIN_TOKEN)" in result.stderr
