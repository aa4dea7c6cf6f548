"""Certificate update latency: from the command returning to the new
certificate being served, polled with real handshakes."""

from __future__ import annotations

import shutil
import socket
import ssl
import statistics
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.certs import CACHE, _ca, _pem_key, leaf
from benchmarks.systems import BENCH_HOST, EDGE_BIN, Certificates, System


def _served(port: int) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=BENCH_HOST) as tls:
        return tls.getpeercert(binary_form=True) or b""


def _second_certificate() -> tuple[Path, Path]:
    """Another ECDSA certificate for BENCH_HOST, to alternate with the first."""
    cert_path, key_path = CACHE / "ecdsa-b.crt", CACHE / "ecdsa-b.key"
    if not cert_path.exists():
        ca_key, ca_cert = _ca(CACHE)
        key = ec.generate_private_key(ec.SECP256R1())
        cert_path.write_bytes(leaf(ca_key, ca_cert, [BENCH_HOST], key).public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
    return cert_path, key_path


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def _wait_served(port: int, want: bytes, timeout: float = 30.0, log: Path | None = None) -> float:
    """When the new certificate is first served. A slow update is a measurement
    (it shows in max_ms); only one never applied within ``timeout`` is an error."""
    deadline = time.perf_counter() + timeout
    served = b""
    while time.perf_counter() < deadline:
        served = _served(port)
        if served == want:
            return time.perf_counter()
    subject = x509.load_der_x509_certificate(served).serial_number if served else None
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"the new certificate was not served within {timeout:.0f}s "
                       f"(still serving serial {subject}); log tail:\n{tail}")


def _summary(latencies: list[float], command: list[float]) -> dict[str, float]:
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, round(p * (len(latencies) - 1)))] * 1000

    return {"updates": len(latencies), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": latencies[-1] * 1000,
            "command_p50_ms": statistics.median(command) * 1000}


def measure_updates(system: System, certs: Certificates, workdir: Path, updates: int) -> dict[str, float]:
    pairs = [(certs.ecdsa_cert, certs.ecdsa_key), _second_certificate()]
    latencies, command = [], []
    for i in range(updates):
        cert, key = pairs[(i + 1) % 2]
        started = time.perf_counter()
        subprocess.run([EDGE_BIN, "--config", str(system.config), "domains-ssl", BENCH_HOST,  # type: ignore[attr-defined]
                        "--cert", str(cert), "--key", str(key)], check=True, capture_output=True)
        returned = time.perf_counter()
        command.append(returned - started)
        latencies.append(_wait_served(system.port, _der(cert), log=workdir / "edge.log") - returned)
    return _summary(latencies, command)


def measure_nginx_reload(system: System, certs: Certificates, workdir: Path, updates: int) -> dict[str, float]:
    """The nginx way: replace the files and `nginx -s reload` (new workers, old ones drain)."""
    root = workdir / "nginx"
    conf = root / "nginx.conf"
    live_cert, live_key = root / "live.crt", root / "live.key"
    shutil.copyfile(certs.ecdsa_cert, live_cert)
    shutil.copyfile(certs.ecdsa_key, live_key)
    conf.write_text(conf.read_text().replace(str(certs.ecdsa_cert), str(live_cert))
                    .replace(str(certs.ecdsa_key), str(live_key)))
    subprocess.run(["nginx", "-p", str(root), "-c", str(conf), "-s", "reload"], check=True, capture_output=True)
    _wait_served(system.port, _der(certs.ecdsa_cert))
    pairs = [(certs.ecdsa_cert, certs.ecdsa_key), _second_certificate()]
    latencies, command = [], []
    for i in range(updates):
        cert, key = pairs[(i + 1) % 2]
        started = time.perf_counter()
        shutil.copyfile(cert, live_cert)
        shutil.copyfile(key, live_key)
        subprocess.run(["nginx", "-p", str(root), "-c", str(conf), "-s", "reload"], check=True, capture_output=True)
        returned = time.perf_counter()
        command.append(returned - started)
        latencies.append(_wait_served(system.port, _der(cert)) - returned)
    return _summary(latencies, command)
