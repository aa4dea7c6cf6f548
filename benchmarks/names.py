"""Many names: 10k, 100k (and more) certificates in the store.

For each size: time from start to the first handshake, RSS (and for edge PSS
summed over every process: the shared index's pages count once) once serving, and
handshake rates over SNI names drawn uniformly (cold: more names than the
context cache holds) and Zipf-distributed (warm). nginx and HAProxy load
every certificate at start, so they run at the sizes they can load; how long
that took is recorded. edge runs with ``workers = 1``, ``2`` and ``auto``
(rows ``edge``, ``edge-w2``, ``edge-wauto``), and each is restarted once with
its index on disk: ``restart_first_s`` (a name's own certificate) and
``restart_loaded_s`` (every name in the index) measure that start.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from benchmarks import load
from benchmarks.certs import many_names
from benchmarks.systems import EDGE_BIN, PROXY_CORE, System, edge_conf, free_port, nginx_conf, rss_kib

if TYPE_CHECKING:
    from benchmarks.suite import Run


def _covers(der: bytes, name: str) -> bool:
    """The served leaf is the one for ``name`` (not a default certificate)."""
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return name in san.value.get_values_for_type(x509.DNSName)


def _first_handshake(port: int, names: list[str], proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until a random name gets *its own* certificate: a server that
    answers before it has loaded that name does not count as started."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    started = time.monotonic()
    name = random.choice(names)
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=name) as tls:
                cert = tls.getpeercert(binary_form=True)
                if cert and _covers(cert, name):
                    return time.monotonic() - started
                time.sleep(0.05)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no handshake within {timeout}s")


def copy_entries(index_dir: Path) -> int:
    """Entries committed in edge's local copy at ``index_dir`` (LMDB, read-only,
    from outside edge): a full load commits them all in one transaction."""
    import lmdb

    try:
        env = lmdb.open(str(index_dir), readonly=True, max_dbs=8, lock=True, subdir=True)
    except lmdb.Error:
        return 0
    try:
        entries = env.open_db(b"entries", create=False)
        with env.begin() as txn:
            return int(txn.stat(entries)["entries"])
    except lmdb.Error:
        return 0
    finally:
        env.close()


def _loaded(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=5) as response:
            return json.loads(response.read()).get("index", "loaded") == "loaded"
    except OSError:
        return False


def pss_kib(pids: list[int]) -> int:
    """Proportional set size summed over ``pids``: a page mapped by n processes counts 1/n in each."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


class _NamesSystem(System):
    names_dir: Path
    start_s: float = 0.0
    loaded_s: float = 0.0  # until every name is in memory (nginx, HAProxy: before they serve at all)

    cores = PROXY_CORE

    def spawn_timed(self, argv: list[str], names: list[str], timeout: float = 900.0) -> None:
        log = self.workdir / f"{self.name}-names.log"
        with open(log, "ab") as out:
            began = time.monotonic()
            self.proc = subprocess.Popen(["taskset", "-c", self.cores, *argv], stdout=out, stderr=subprocess.STDOUT)
        try:
            _first_handshake(self.port, names, self.proc, timeout)
            self.start_s = self.loaded_s = time.monotonic() - began
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{self.name}: {exc}\n{log.read_text()[-1500:]}") from None


class EdgeNames(_NamesSystem):
    edge_workers = "1"  # [server] workers
    restart_first_s = restart_loaded_s = 0.0

    def start(self) -> None:
        root = self.workdir / "edge-names"
        subprocess.run(["rm", "-rf", str(root)], check=True)
        root.mkdir(parents=True)
        # Hard links: the store is the cached one, without copying gigabytes.
        subprocess.run(["cp", "-al", str(self.names_dir / "store"), str(root / "store")], check=True)
        (root / "store" / "apps").mkdir(exist_ok=True)
        (root / "store" / "apps" / "bench.json").write_text(
            f'{{"backends": ["127.0.0.1:{self.backend_port}"], "force_https": true}}\n')
        admin_port = free_port()
        workers = '"auto"' if self.edge_workers == "auto" else int(self.edge_workers)
        config = edge_conf(root, self.port, admin_port=admin_port, workers=workers)  # type: ignore[arg-type]
        self._run_until_loaded(config, admin_port)
        # Restart with the index on disk, the store unchanged. The copy is
        # committed a moment after "index": "loaded" (every name's record is
        # written, then one commit); stopped before, it is still empty and the
        # restart would be a first start again (3.8-6.1 s measured for a 1 s restart).
        first, loaded = self.start_s, self.loaded_s
        self._wait_copy(root / "index", 2 * len((self.names_dir / "names.txt").read_text().split()) + 1)
        self.stop()
        self._run_until_loaded(config, admin_port)
        self.restart_first_s, self.restart_loaded_s = self.start_s, self.loaded_s
        self.start_s, self.loaded_s = first, loaded

    def _wait_copy(self, index_dir: Path, entries: int) -> None:
        deadline = time.monotonic() + 900
        while copy_entries(index_dir) < entries:
            if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                held = copy_entries(index_dir)
                raise RuntimeError(f"edge did not write its local copy ({held} of {entries} entries)")
            time.sleep(0.1)

    def _run_until_loaded(self, config: Path, admin_port: int) -> None:
        names = (self.names_dir / "names.txt").read_text().split()
        began = time.monotonic()
        self.spawn_timed([EDGE_BIN, "serve", "--config", str(config)], names)
        # edge serves (every name correctly) while it loads the rest of its store
        # in the background: measure the rates and memory once that is done.
        deadline = time.monotonic() + 900
        while not _loaded(admin_port):
            if time.monotonic() > deadline or self.proc is None or self.proc.poll() is not None:
                log = self.workdir / f"{self.name}-names.log"
                raise RuntimeError(f"edge did not finish loading its store:\n{log.read_text()[-1500:]}")
            time.sleep(0.1)
        self.loaded_s = time.monotonic() - began


class NginxNames(_NamesSystem):
    def start(self) -> None:
        root = self.workdir / "nginx-names"
        root.mkdir(parents=True, exist_ok=True)
        names = (self.names_dir / "names.txt").read_text().split()
        key = self.names_dir / "shared.key"
        servers = "".join(
            f"server {{ listen 127.0.0.1:{self.port} ssl; server_name {n}; ssl_certificate "
            f"{self.names_dir / 'pem' / (n + '.crt')}; ssl_certificate_key {key}; "
            "location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }\n"
            for n in names
        )
        conf = nginx_conf(root, textwrap.dedent(f"""
              server_names_hash_max_size 4194304;
              server_names_hash_bucket_size 128;
              upstream app {{ server 127.0.0.1:{self.backend_port}; keepalive 64; }}
        """) + servers)
        self.spawn_timed(["nginx", "-p", str(root), "-c", str(conf), "-g", "daemon off; user root;"], names)


class HaproxyNames(_NamesSystem):
    def start(self) -> None:
        root = self.workdir / "haproxy-names"
        root.mkdir(parents=True, exist_ok=True)
        names = (self.names_dir / "names.txt").read_text().split()
        crt_list = root / "crt-list.txt"
        crt_list.write_text("".join(f"{self.names_dir / 'combined' / (n + '.pem')}\n" for n in names))
        conf = root / "haproxy.cfg"
        conf.write_text(textwrap.dedent(f"""
            global
              nbthread 1
              maxconn 5000
            defaults
              mode http
              timeout connect 5s
              timeout client 75s
              timeout server 60s
            frontend fe
              bind 127.0.0.1:{self.port} ssl crt-list {crt_list} alpn http/1.1
              default_backend be
            backend be
              http-reuse always
              server app 127.0.0.1:{self.backend_port}
        """))
        self.spawn_timed(["haproxy", "-db", "-f", str(conf)], names)


class EdgeNames2(EdgeNames):
    edge_workers = "2"


class EdgeNamesAuto(EdgeNames):
    edge_workers = "auto"
    cores = "0,1"  # "auto" counts the cores edge may run on: pinned to one, it would mean 1


CLASSES = {"edge": EdgeNames, "edge-w2": EdgeNames2, "edge-wauto": EdgeNamesAuto,
           "nginx": NginxNames, "haproxy": HaproxyNames}


def run_many_names(run: Run) -> dict[str, dict[str, float]]:
    if run.tiny:
        sizes = [100]
    elif run.quick:
        sizes = [1000]
    else:
        sizes = [int(s) for s in os.environ.get("EDGE_BENCH_NAMES", "10000,100000,1000000").split(",")]
    peer_limit = int(os.environ.get("EDGE_BENCH_PEER_NAMES", "10000"))
    duration = run.duration
    out: dict[str, dict[str, float]] = {}
    for size in sizes:
        directory = many_names(size)
        systems = [*run.peers, "edge-w2", "edge-wauto"] if "edge" in run.peers else run.peers
        for system_name in systems:
            if not system_name.startswith("edge") and size > peer_limit:
                continue
            system = CLASSES[system_name](system_name, run.workdir, run.backend.port, run.certs)
            system.names_dir = directory
            try:
                system.start()
                rss = rss_kib(system.pids()) / 1024
                cold = run.measure(system, lambda s=system, d=directory: load.handshakes(
                    s.port, d / "names.txt", duration, 8))
                warm = run.measure(system, lambda s=system, d=directory: load.handshakes(
                    s.port, d / "names.txt", duration, 8, zipf=True))
                result = {"names": size, "start_s": system.start_s, "loaded_s": system.loaded_s, "rss_mib": rss,
                          "pss_mib": pss_kib(system.pids()) / 1024, "processes": len(system.pids()),
                          **({"restart_first_s": system.restart_first_s, "restart_loaded_s": system.restart_loaded_s}
                             if isinstance(system, EdgeNames) else {}),
                          "rss_after_mib": rss_kib(system.pids()) / 1024,
                          "cold_rate": cold["rate"], "cold_per_cpu_s": cold["per_cpu_s"], "cold_p99_ms": cold["p99_ms"],
                          "warm_rate": warm["rate"], "warm_per_cpu_s": warm["per_cpu_s"], "warm_p99_ms": warm["p99_ms"],
                          "errors": cold["errors"] + warm["errors"]}
            except RuntimeError as exc:
                result = {"names": size, "error": str(exc).splitlines()[0]}
            finally:
                system.stop()
            out[f"{system_name}@{size}"] = result
            shown = {k: v for k, v in result.items() if isinstance(v, float | int)}
            print(f"  {'names ' + str(size):<24} {system_name:<8} " +
                  " ".join(f"{k}={v:.1f}" for k, v in shown.items()), flush=True)
    return out
