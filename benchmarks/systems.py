"""The systems under test (edge, nginx, HAProxy) and the shared backend,
each started from a generated config in a scratch directory.

Proxies run pinned to core 0 (``PROXY_CORE``); the backend and the load
generators to core 1 (``LOAD_CORE``), so a proxy's CPU time is its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.setup import TOOLS

PROXY_CORE = "0"
LOAD_CORE = "1"
EDGE_BIN = str(Path(sys.executable).parent / "edge")
BENCH_HOST = "bench.example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (nginx's workers, HAProxy's master/worker)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """User and system (kernel) CPU seconds of ``pids`` (all their threads), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime, stat field 14
        system += int(fields[12])  # stime, stat field 15
    return user / ticks, system / ticks


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads), from /proc."""
    return sum(cpu_split(pids))


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def nginx_conf(root: Path, http_body: str, workers: int = 1) -> Path:
    """An nginx.conf running from ``root`` (pid, logs, temp files there) with
    ``http_body`` inside its http block; returns its path."""
    conf = root / "nginx.conf"
    conf.write_text(
        f"worker_processes {workers};\npid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n"
        "events { worker_connections 20000; }\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {root}/tmp;\n  proxy_temp_path {root}/tmp;\n"
        f"{http_body}\n}}\n"
    )
    return conf


def edge_conf(root: Path, port: int, workers: int = 1, admin_port: int | None = None,
              etcd: str | None = None) -> Path:
    """An edge.toml in ``root``: TLS on ``port``, its store (under ``root``, or
    the etcd at ``etcd``) and dev CA under ``root``."""
    config = root / "edge.toml"
    admin = f"127.0.0.1:{admin_port}" if admin_port else ""
    store = (f'backend = "etcd"\n        [store.etcd]\n        endpoints = ["{etcd}"]\n        prefix = "/bench/"'
             if etcd else 'path = "store"')
    config.write_text(textwrap.dedent(f"""
        [server]
        https = ["127.0.0.1:{port}"]
        http = ["127.0.0.1:{free_port()}"]
        admin = "{admin}"
        workers = {workers}
        [platform]
        domain = "edge.bench"
        cert = "dev/platform.crt"
        key = "dev/platform.key"
        [store]
        {store}
        [log]
        level = "warning"
    """))
    return config


@dataclass
class Certificates:
    ecdsa_cert: Path
    ecdsa_key: Path
    rsa_cert: Path
    rsa_key: Path
    ca: Path

    def pair(self, key_type: str) -> tuple[Path, Path]:
        return (self.ecdsa_cert, self.ecdsa_key) if key_type == "ecdsa" else (self.rsa_cert, self.rsa_key)


@dataclass
class System:
    """One proxy under test, listening on ``port`` (TLS) in front of ``backend_port``."""

    name: str
    workdir: Path
    backend_port: int
    certs: Certificates
    key_type: str = "ecdsa"
    workers: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    version: str = ""

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                for pid in self.pids():
                    os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def _spawn(self, argv: list[str], cores: str = PROXY_CORE) -> None:
        log_path = self.workdir / f"{self.name}.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(["taskset", "-c", cores, *argv], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, proc=self.proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {exc}\n{log_path.read_text()[-2000:]}") from None

    def start(self) -> None:
        raise NotImplementedError


class Backend(System):
    """nginx serving fixed answers on the load core: the same app behind every proxy."""

    def start(self) -> None:
        root = self.workdir / "backend"
        root.mkdir(parents=True, exist_ok=True)
        (root / "64k.bin").write_bytes(b"x" * 65536)
        conf = nginx_conf(root, textwrap.dedent(f"""
              keepalive_requests 10000000;
              server {{
                listen 127.0.0.1:{self.port} backlog=4096;
                location = /small {{ return 200 "hello, world\\n"; }}
                location = /64k {{ alias {root}/64k.bin; }}
                location / {{ return 200 "ok\\n"; }}
              }}
        """))
        self._spawn(["nginx", "-p", str(root), "-c", str(conf), "-g", "daemon off; user root;"], LOAD_CORE)


class Edge(System):
    def start(self) -> None:
        root = self.workdir / "edge"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        config = edge_conf(root, self.port, self.workers)
        cert, key = self.certs.pair(self.key_type)
        env_cli = [EDGE_BIN, "--config", str(config)]
        subprocess.run([*env_cli, "apps-add", "bench", "--backend", f"127.0.0.1:{self.backend_port}"],
                       check=True, capture_output=True)
        subprocess.run([*env_cli, "domains-add", BENCH_HOST, "--app", "bench", "--cert", str(cert),
                        "--key", str(key)], check=True, capture_output=True)
        self.config = config
        self._spawn([EDGE_BIN, "serve", "--config", str(config)])
        from importlib.metadata import version

        self.version = f"edge {version('edge')} (Python {sys.version.split()[0]}, uvloop {version('uvloop')})"


class Nginx(System):
    def start(self) -> None:
        root = self.workdir / "nginx"
        root.mkdir(parents=True, exist_ok=True)
        cert, key = self.certs.pair(self.key_type)
        conf = nginx_conf(root, workers=self.workers, http_body=textwrap.dedent(f"""
              keepalive_requests 10000000;
              upstream app {{ server 127.0.0.1:{self.backend_port}; keepalive 256; }}  # edge's pool_size
              ssl_protocols TLSv1.2 TLSv1.3;
              ssl_session_cache shared:SSL:10m;
              server {{
                listen 127.0.0.1:{self.port} ssl http2 backlog=4096;
                server_name {BENCH_HOST};
                ssl_certificate {cert};
                ssl_certificate_key {key};
                location / {{
                  proxy_pass http://app;
                  proxy_http_version 1.1;
                  proxy_set_header Connection "";
                  proxy_set_header Host $host;
                  proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                  proxy_set_header X-Forwarded-Proto https;
                }}
              }}
        """))
        self._spawn(["nginx", "-p", str(root), "-c", str(conf), "-g", "daemon off; user root;"])
        self.version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()


class Haproxy(System):
    def start(self) -> None:
        root = self.workdir / "haproxy"
        root.mkdir(parents=True, exist_ok=True)
        cert, key = self.certs.pair(self.key_type)
        combined = root / "bundle.pem"
        combined.write_bytes(cert.read_bytes() + key.read_bytes())
        combined.chmod(0o600)
        conf = root / "haproxy.cfg"
        # HAProxy needs two descriptors per connection and refuses to start
        # when maxconn does not fit the process's descriptor limit.
        import resource

        maxconn = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100) // 2
        conf.write_text(textwrap.dedent(f"""
            global
              nbthread {self.workers}
              maxconn {maxconn}
              ssl-default-bind-options ssl-min-ver TLSv1.2
            defaults
              mode http
              timeout connect 5s
              timeout client 75s
              timeout server 60s
              timeout http-keep-alive 75s
              option forwardfor
            frontend fe
              bind 127.0.0.1:{self.port} ssl crt {combined} alpn h2,http/1.1
              default_backend be
            backend be
              http-reuse always
              server app 127.0.0.1:{self.backend_port}
        """))
        self._spawn(["haproxy", "-db", "-f", str(conf)])
        self.version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]


class StackCeiling(System):
    """Not a proxy: edge's TLS stack alone (``benchmarks/stack_ceiling.py``), for reference."""

    def start(self) -> None:
        cert, key = self.certs.pair(self.key_type)
        self._spawn([sys.executable, "-m", "benchmarks.stack_ceiling", "--port", str(self.port),
                     "--cert", str(cert), "--key", str(key)])
        self.version = "uvloop-tls: benchmarks/stack_ceiling.py (no proxying)"


class StackRelay(System):
    """The cheapest proxy on edge's stack: ``benchmarks/stack_ceiling.py --backend``
    relays each connection's bytes to its own backend connection, parsing nothing."""

    def start(self) -> None:
        cert, key = self.certs.pair(self.key_type)
        self._spawn([sys.executable, "-m", "benchmarks.stack_ceiling", "--port", str(self.port),
                     "--cert", str(cert), "--key", str(key), "--backend", f"127.0.0.1:{self.backend_port}"])
        self.version = "uvloop-relay: benchmarks/stack_ceiling.py --backend (verbatim relay, no parsing)"


class StackPool(System):
    """``uvloop-relay`` with backend connections pooled across clients, as edge
    and nginx pool them: no backend connect per client connection."""

    def start(self) -> None:
        cert, key = self.certs.pair(self.key_type)
        self._spawn([sys.executable, "-m", "benchmarks.stack_ceiling", "--port", str(self.port),
                     "--cert", str(cert), "--key", str(key), "--backend", f"127.0.0.1:{self.backend_port}", "--pool"])
        self.version = ("uvloop-pool: benchmarks/stack_ceiling.py --backend --pool (verbatim relay over pooled "
                        "backend connections; parses only request heads and Content-Length)")


PEERS = {"edge": Edge, "nginx": Nginx, "haproxy": Haproxy, "uvloop-tls": StackCeiling, "uvloop-relay": StackRelay,
         "uvloop-pool": StackPool}


def available_peers() -> tuple[list[str], dict[str, str]]:
    """The systems whose binaries are installed, and why others are skipped."""
    found, skipped = ["edge", "uvloop-tls", "uvloop-relay", "uvloop-pool"], {}
    for name, binary in (("nginx", "nginx"), ("haproxy", "haproxy")):
        if shutil.which(binary):
            found.append(name)
        else:
            skipped[name] = f"{binary} not installed (apt-get install {TOOLS[binary]}; make bench installs it)"
    return found, skipped
