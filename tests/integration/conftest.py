"""A real edge process on real sockets, a real backend, real TLS clients."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

EDGE = str(Path(sys.executable).parent / "edge")
_SERVING = re.compile(r"edge serving https on ([\d.]+):(\d+), http on ([\d.]+):(\d+)")


class EchoHandler(BaseHTTPRequestHandler):
    """A backend that answers with what it received, as JSON."""

    protocol_version = "HTTP/1.1"

    def _read_body(self) -> tuple[int, str]:
        """Read the request body as it streams in: (length, sha256), nothing kept."""
        digest = hashlib.sha256()
        total = 0
        if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return total, digest.hexdigest()
                left = size
                while left:
                    piece = self.rfile.read(min(left, 1 << 20))
                    digest.update(piece)
                    left -= len(piece)
                total += size
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left:
            piece = self.rfile.read(min(left, 1 << 20))
            if not piece:
                break
            digest.update(piece)
            total += len(piece)
            left -= len(piece)
        return total, digest.hexdigest()

    def _answer(self) -> None:
        body_length, body_sha256 = self._read_body()
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/bytes/"):
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * (1 << 16)
            while size > 0:
                self.wfile.write(block[: min(size, len(block))])
                size -= len(block)
            return
        if self.path.startswith("/slow/"):
            time.sleep(int(self.path.split("/")[2]) / 1000)
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body_length": body_length,
                "body_sha256": body_sha256,
                "backend": self.server.server_address[1],
                "client_port": self.client_address[1],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


class WideBackend(ThreadingHTTPServer):
    # socketserver's default backlog is 5: 40 streams of one HTTP/2 connection
    # open 40 backend connections at once, and on a loaded machine the SYNs
    # over the backlog were dropped and retried a second or more later (a
    # test timing out after 30 s in 3 of 4 runs under load).
    request_queue_size = 512
    daemon_threads = True


@pytest.fixture(scope="session")
def backend() -> Iterator[str]:
    server = WideBackend(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


class EdgeProcess:
    """``edge serve`` in a subprocess on a private store and ports."""

    def __init__(self, root: Path, extra_config: str = "") -> None:
        self.root = root
        self.config = root / "edge.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            textwrap.dedent(
                """
                [server]
                https = ["127.0.0.1:0"]
                http = ["127.0.0.1:0"]
                admin = ""
                [platform]
                domain = "edge.test"
                cert = "dev/platform.crt"
                key = "dev/platform.key"
                [store]
                path = "store"
                [proxy]
                handshake_timeout = 5
                [log]
                level = "debug"
                """
            )
            + extra_config
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.https_port = self.http_port = 0
        self.log = bytearray()

    def start(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [EDGE, "serve", "--config", str(self.config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.log += chunk
                match = _SERVING.search(self.log.decode(errors="replace"))
                if match:
                    self.https_port = int(match.group(2))
                    self.http_port = int(match.group(4))
                    threading.Thread(target=self._drain, daemon=True).start()
                    return
        raise AssertionError(f"edge did not start:\n{self.log.decode(errors='replace')}")

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.log += chunk

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [EDGE, "--config", str(self.config), *args], capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(f"edge {' '.join(args)} failed: {result.stderr}")
        return result

    @property
    def dev_ca(self) -> Path:
        return self.root / "dev" / "ca.crt"

    # --- clients -------------------------------------------------------------------
    def handshake(self, server_name: str | None, *, rsa_only: bool = False,
                  tls13: bool = True) -> bytes:
        """The DER leaf certificate edge serves for ``server_name`` (stdlib client)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if rsa_only:
            # TLS 1.2 with RSA key exchange suites only: no ECDSA certificate fits.
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
        elif not tls13:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der

    def status(self, host: str, path: str = "/") -> int:
        """The status edge answers for ``host`` over TLS (0 when the handshake fails)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with socket.create_connection(("127.0.0.1", self.https_port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                head = tls.recv(64)
        except (OSError, ssl.SSLError):
            return 0
        return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0

    def wait_routed(self, host: str, path: str = "/", timeout: float = 5.0) -> None:
        """Wait until edge applied the store change that routes ``host`` (SPEC §6:
        within 100 ms of the command returning; tests must not assume 0 ms).
        ``path`` must be one the app's backend does not answer 404 itself."""
        wait_for(lambda: self.status(host, path) not in (0, 404), timeout=timeout)

    def handshake_or_empty(self, server_name: str | None, **kwargs: bool) -> bytes:
        """Like ``handshake``, but b"" when it fails (a certificate not applied yet)."""
        try:
            return self.handshake(server_name, **kwargs)
        except (OSError, ssl.SSLError):
            return b""

    def openssl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{self.https_port}", *args],
            input="", capture_output=True, text=True, timeout=10,
        )

    def curl(self, url: str, *args: str) -> subprocess.CompletedProcess[str]:
        host = re.match(r"https?://([^/:]+)", url)
        assert host
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10",
             "--resolve", f"{host.group(1)}:{self.https_port}:127.0.0.1",
             "--resolve", f"{host.group(1)}:{self.http_port}:127.0.0.1",
             *args, url],
            capture_output=True, text=True, timeout=20,
        )


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll until ``predicate()`` is truthy; the value, or AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[EdgeProcess]:
    process = EdgeProcess(tmp_path_factory.mktemp("edge"))
    process.start()
    process.cli("apps-add", "demo", "--backend", backend)
    process.wait_routed("demo.edge.test")
    yield process
    process.stop()


@pytest.fixture
def write_pem(tmp_path: Path):
    """Write a pki.Pem to files; returns (cert path, key path)."""
    counter = iter(range(1_000_000))

    def write(pem, name: str = "bundle") -> tuple[str, str]:
        n = next(counter)
        cert = tmp_path / f"{name}-{n}.crt"
        key = tmp_path / f"{name}-{n}.key"
        cert.write_bytes(pem.cert)
        key.write_bytes(pem.key)
        return str(cert), str(key)

    return write


def _below_ephemeral() -> range:
    """Ports under the kernel's ephemeral range: no outgoing connection takes one
    as its local port between free_port() and the server's bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


_FREE_PORTS = _below_ephemeral()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now (for servers whose port must be known before they start).
    Not from bind(0): that is the ephemeral range, where any client connection on the
    host may take the port before the server binds it. Never the same port twice."""
    for _ in range(1000):
        port = _FREE_PORTS[int.from_bytes(os.urandom(2), "big") % len(_FREE_PORTS)]
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free loopback port in {_FREE_PORTS}")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        from tests.provision import hint

        raise AssertionError(hint(name))
    return path


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator:
    """A real etcd (Debian's etcd-server), started for one test."""
    from tests.integration.etcd_server import Etcd

    server = Etcd(tmp_path / "etcd")
    server.root.mkdir()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
