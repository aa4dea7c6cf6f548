"""``[server] metrics``: /metrics and /healthz without the admin token, for
Prometheus and probes, while the admin API keeps requiring it."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest

from tests.integration.conftest import EdgeProcess, free_port


@pytest.fixture(scope="module")
def edge_with_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("metrics"))
    process.admin_port, process.metrics_port = free_port(), free_port()  # type: ignore[attr-defined]
    process.config.write_text(process.config.read_text().replace(
        'admin = ""', f'admin = "127.0.0.1:{process.admin_port}"\nadmin_token = "t0ken"\n'  # type: ignore[attr-defined]
                      f'metrics = "127.0.0.1:{process.metrics_port}"'))  # type: ignore[attr-defined]
    process.start()
    yield process
    process.stop()


def get(port: int, path: str, host: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host or f"127.0.0.1:{port}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_metrics_and_healthz_without_token(edge_with_metrics: EdgeProcess) -> None:
    port = edge_with_metrics.metrics_port  # type: ignore[attr-defined]
    status, body = get(port, "/metrics")
    assert status == 200 and b"edge_handshakes_total" in body
    status, body = get(port, "/healthz")
    assert status == 200 and b'"status": "ok"' in body
    # Nothing else: the admin routes stay on the admin address, behind the token.
    assert get(port, "/v1/apps")[0] == 404
    assert get(port, "/openapi.json")[0] == 404
    assert get(edge_with_metrics.admin_port, "/metrics")[0] == 401  # type: ignore[attr-defined]
    # Against DNS rebinding like the admin API: a page on another name cannot read it.
    assert get(port, "/metrics", host=f"evil.example:{port}")[0] == 421
