"""Requests reach the app's backend over real TLS, and answers come back."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl

from tests.integration.conftest import EdgeProcess


def connect(edge: EdgeProcess, host: str = "demo.edge.test") -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(edge.dev_ca))
    conn = http.client.HTTPSConnection(host, edge.https_port, context=ctx, timeout=10)
    sock = socket.create_connection(("127.0.0.1", edge.https_port))
    conn.sock = ctx.wrap_socket(sock, server_hostname=host)
    return conn


def request(conn: http.client.HTTPSConnection, method: str, path: str, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    return response, data


def test_forwarding_headers(edge: EdgeProcess) -> None:
    conn = connect(edge)
    response, data = request(conn, "GET", "/h?x=1", headers={"X-Forwarded-For": "203.0.113.9",
                                                             "Connection": "keep-alive, X-Drop", "X-Drop": "1"})
    assert response.status == 200
    echo = json.loads(data)
    headers = dict(echo["headers"])
    assert echo["path"] == "/h?x=1"
    assert headers["x-forwarded-for"] == "127.0.0.1"  # not a trusted proxy: replaced (SPEC §5)
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-port"] == str(edge.https_port)
    assert len(headers["x-request-id"]) == 32
    assert headers["host"] == f"demo.edge.test:{edge.https_port}"  # passed through as sent
    assert "x-drop" not in headers
    response, data = request(conn, "GET", "/", headers={"X-Request-ID": "trace-me"})
    assert dict(json.loads(data)["headers"])["x-request-id"] == "trace-me"


def test_keepalive_reuses_client_and_backend_connections(edge: EdgeProcess) -> None:
    conn = connect(edge)
    ports = set()
    for i in range(5):
        response, data = request(conn, "GET", f"/k{i}")
        assert response.status == 200 and not response.will_close
        ports.add(json.loads(data)["client_port"])
    # One client connection, and the backend saw one pooled connection.
    assert len(ports) == 1


def test_request_bodies_content_length_and_chunked(edge: EdgeProcess) -> None:
    conn = connect(edge)
    body = os.urandom(3 * 1024 * 1024)
    _response, data = request(conn, "POST", "/upload", body=body)
    echo = json.loads(data)
    assert echo["body_length"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()

    def pieces():
        for _ in range(50):
            yield os.urandom(10_000)

    conn.request("PUT", "/upload-chunked", body=pieces(), encode_chunked=True)
    echo = json.loads(conn.getresponse().read())
    assert echo["method"] == "PUT" and echo["body_length"] == 500_000


def test_chunked_response_and_head(edge: EdgeProcess) -> None:
    conn = connect(edge)
    response, data = request(conn, "GET", "/chunked")
    assert response.status == 200 and data == b"first,second,third"
    assert response.getheader("Transfer-Encoding") == "chunked"
    response, data = request(conn, "HEAD", "/")
    assert response.status == 200 and data == b"" and int(response.getheader("Content-Length")) > 0
    response, data = request(conn, "GET", "/after-head")
    assert json.loads(data)["path"] == "/after-head"


def test_dead_backend_502_and_failover(edge: EdgeProcess, backend: str) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there: connections are refused
    edge.cli("apps-add", "broken", "--backend", dead_address)
    edge.wait_routed("broken.edge.test")
    conn = connect(edge, "broken.edge.test")
    response, data = request(conn, "GET", "/")
    assert response.status == 502 and b"502 Bad Gateway" in data
    edge.cli("apps-add", "halfway", "--backend", dead_address, "--backend", backend)
    edge.wait_routed("halfway.edge.test")
    for _ in range(4):
        response, _ = request(connect(edge, "halfway.edge.test"), "GET", "/")
        assert response.status == 200


def test_http_port_redirects_or_serves(edge: EdgeProcess, backend: str) -> None:
    result = edge.curl(f"http://demo.edge.test:{edge.http_port}/p?q=1", "-o", "/dev/null",
                       "-w", "%{http_code} %{redirect_url}")
    assert result.stdout == f"301 https://demo.edge.test:{edge.https_port}/p?q=1"
    edge.cli("apps-add", "plain", "--backend", backend, "--no-force-https")
    edge.wait_routed("plain.edge.test")
    result = edge.curl(f"http://plain.edge.test:{edge.http_port}/plain")
    echo = json.loads(result.stdout)
    assert echo["path"] == "/plain" and dict(echo["headers"])["x-forwarded-proto"] == "http"
