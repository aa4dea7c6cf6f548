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
from benchmarks.systems import (
    BENCH_HOST,
    EDGE_BIN,
    LOAD_CORE,
    PROXY_CORE,
    Certificates,
    System,
    edge_conf,
    free_port,
    wait_port,
)


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


def measure_etcd_fleet(certs: Certificates, workdir: Path, backend_port: int, updates: int) -> dict[str, float]:
    """Two edge nodes on one etcd (the fleet setup): from `edge domains-ssl`
    returning to the new certificate served by *both* nodes."""
    etcd_bin = shutil.which("etcd")
    if etcd_bin is None:
        raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
    root = workdir / "fleet"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    client, peer = free_port(), free_port()
    endpoint = f"127.0.0.1:{client}"
    procs: list[subprocess.Popen[bytes]] = []
    log = open(root / "fleet.log", "ab")  # noqa: SIM115 - closed below, after the processes
    try:
        procs.append(subprocess.Popen(
            ["taskset", "-c", LOAD_CORE, etcd_bin, "--data-dir", str(root / "etcd"), "--name", "bench",
             "--listen-client-urls", f"http://{endpoint}", "--advertise-client-urls", f"http://{endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"bench=http://127.0.0.1:{peer}"],
            stdout=log, stderr=subprocess.STDOUT))
        wait_port(client, proc=procs[0])
        nodes = []
        for name in ("a", "b"):
            (root / name).mkdir()
            port = free_port()
            nodes.append((port, edge_conf(root / name, port, etcd=endpoint)))
        cli = [EDGE_BIN, "--config", str(nodes[0][1])]
        subprocess.run([*cli, "apps-add", "bench", "--backend", f"127.0.0.1:{backend_port}"],
                       check=True, capture_output=True)
        subprocess.run([*cli, "domains-add", BENCH_HOST, "--app", "bench", "--cert", str(certs.ecdsa_cert),
                        "--key", str(certs.ecdsa_key)], check=True, capture_output=True)
        for port, config in nodes:
            procs.append(subprocess.Popen(["taskset", "-c", PROXY_CORE, EDGE_BIN, "serve", "--config", str(config)],
                                          stdout=log, stderr=subprocess.STDOUT))
            wait_port(port, proc=procs[-1])
        for port, _ in nodes:
            _wait_served(port, _der(certs.ecdsa_cert), log=root / "fleet.log")
        pairs = [(certs.ecdsa_cert, certs.ecdsa_key), _second_certificate()]
        latencies, command = [], []
        for i in range(updates):
            cert, key = pairs[(i + 1) % 2]
            started = time.perf_counter()
            subprocess.run([*cli, "domains-ssl", BENCH_HOST, "--cert", str(cert), "--key", str(key)],
                           check=True, capture_output=True)
            returned = time.perf_counter()
            command.append(returned - started)
            # Both nodes polled in turn: the later of the two is when the fleet serves it.
            want = _der(cert)
            pending = [port for port, _ in nodes]
            last = returned
            while pending:
                port = pending[0]
                if _served(port) == want:
                    last = time.perf_counter()
                    pending.pop(0)
                elif time.perf_counter() - returned > 30:
                    raise RuntimeError(f"node on port {port} did not serve the new certificate within 30 s")
            latencies.append(last - returned)
        return _summary(latencies, command)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
