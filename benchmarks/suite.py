"""The benchmark suite: each scenario against edge, nginx and HAProxy in turn,
in the same run, reporting rates per second of proxy CPU and ratios.

    make bench            # complete
    make bench QUICK=1    # every scenario briefly

Results: benchmarks/results/<stamp>.{md,json,png} and latest.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import load, report
from benchmarks.certs import bench_certificates
from benchmarks.systems import LOAD_CORE, PEERS, Backend, Certificates, System, available_peers, cpu_split, rss_kib

RESULTS = Path(__file__).parent / "results"


class Run:
    def __init__(self, quick: bool, workdir: Path, certs: Certificates, peers: list[str], tiny: bool = False) -> None:
        self.quick = quick or tiny
        self.tiny = tiny  # for the test suite: proves every scenario runs, measures nothing worth reading
        self.workdir = workdir
        self.certs = certs
        self.peers = peers
        self.duration = 1.0 if tiny else 3.0 if quick else 10.0
        self.rounds = 1 if self.quick else 2
        self.backend = Backend("backend", workdir, 0, certs)
        self.backend.start()
        self.names_file = workdir / "names.txt"
        self.names_file.write_text("bench.example.test\n")
        self.versions: dict[str, str] = {}

    def system(self, name: str, key_type: str = "ecdsa", workers: int = 1) -> System:
        system = PEERS[name](name, self.workdir, self.backend.port, self.certs, key_type=key_type, workers=workers)
        system.start()
        self.versions[name] = system.version
        return system

    def measure(self, system: System, work: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Run ``work`` against ``system``; add CPU seconds and the rate per CPU second."""
        pids = system.pids()
        user, kernel = cpu_split(pids)
        result = work()
        after = cpu_split(pids)
        result["proxy_user_s"], result["proxy_sys_s"] = after[0] - user, after[1] - kernel
        cpu = result["proxy_user_s"] + result["proxy_sys_s"]
        result["proxy_cpu_s"] = cpu
        result["per_cpu_s"] = result["requests" if "requests" in result else "handshakes"] / cpu if cpu else 0.0
        return result

    def each_system(self, scenario: str, run_one: Callable[[System], dict[str, float]],
                    key_type: str = "ecdsa", workers: int = 1) -> dict[str, dict[str, float]]:
        """Every peer in turn, ``rounds`` times (alternating order), medians kept."""
        samples: dict[str, list[dict[str, float]]] = {p: [] for p in self.peers}
        for round_number in range(self.rounds):
            order = self.peers if round_number % 2 == 0 else list(reversed(self.peers))
            for name in order:
                system = self.system(name, key_type, workers)
                try:
                    samples[name].append(run_one(system))
                finally:
                    system.stop()
                print(f"  {scenario:<24} {name:<8} {_short(samples[name][-1])}", flush=True)
        return {name: _median(values) for name, values in samples.items()}

    # --- scenarios ------------------------------------------------------------------------
    def keepalive(self, path: str) -> dict[str, dict[str, float]]:
        connections = 50

        def run_one(system: System) -> dict[str, float]:
            load.wrk(system.port, path, connections, 1.0)  # warm-up: pools, caches
            peak = self.measure(system, lambda: load.wrk(system.port, path, connections, self.duration))
            # Latency at a fixed rate of half the peak this system reached.
            log = self.workdir / f"h2load-{system.name}.log"
            fixed = load.h2load_fixed_rate(system.port, path, peak["rate"] / 2, connections, self.duration, log)
            peak.update({f"fixed_{k}": v for k, v in fixed.items()})
            return peak

        return self.each_system(f"keep-alive {path}", run_one)

    def h2_small(self) -> dict[str, dict[str, float]]:
        """HTTP/2: 32 connections x 10 concurrent streams, small answers."""

        def run_one(system: System) -> dict[str, float]:
            load.h2load(system.port, "/small", 32, 10, 1.0)  # warm-up
            return self.measure(system, lambda: load.h2load(system.port, "/small", 32, 10, self.duration))

        return self.each_system("h2 small (32x10)", run_one)

    def page_load(self) -> dict[str, dict[str, float]]:
        """A page: a new connection and 40 small resources, over h2 and over 6 HTTP/1.1 connections."""
        pages = 5 if self.tiny else 40 if self.quick else 150

        def run_one(system: System) -> dict[str, float]:
            load.page_loads(system.port, 3, 40, h1=False)  # warm-up
            h2 = self.measure(system, lambda: load.page_loads(system.port, pages, 40, h1=False))
            h1 = self.measure(system, lambda: load.page_loads(system.port, pages, 40, h1=True))
            return {"pages": pages, "errors": h2["errors"] + h1["errors"], "requests": h2["requests"],
                    "proxy_cpu_s": h2["proxy_cpu_s"], "h1_proxy_cpu_s": h1["proxy_cpu_s"],
                    "per_cpu_s": pages / h2["proxy_cpu_s"] if h2["proxy_cpu_s"] else 0.0,
                    "h1_pages_per_cpu_s": pages / h1["proxy_cpu_s"] if h1["proxy_cpu_s"] else 0.0,
                    "h2_cpu_over_h1": h2["proxy_cpu_s"] / h1["proxy_cpu_s"] if h1["proxy_cpu_s"] else 0.0}

        return self.each_system("page load (40 resources)", run_one)

    def handshakes(self, key_type: str) -> dict[str, dict[str, float]]:
        def run_one(system: System) -> dict[str, float]:
            load.handshakes(system.port, self.names_file, 1.0, 8)
            return self.measure(system, lambda: load.handshakes(system.port, self.names_file, self.duration, 8))

        return self.each_system(f"handshakes {key_type}", run_one, key_type)

    def resumed(self) -> dict[str, dict[str, float]]:
        """TLS 1.3 resumption from tickets, two workers (processes or threads) per system."""

        def run_one(system: System) -> dict[str, float]:
            load.handshakes(system.port, self.names_file, 1.0, 8, resume=True)
            result = self.measure(system, lambda: load.handshakes(system.port, self.names_file, self.duration, 8,
                                                                  resume=True))
            result["resumed_share"] = result["resumed"] / result["handshakes"] if result["handshakes"] else 0.0
            return result

        return self.each_system("resumed, 2 workers", run_one, workers=2)

    def update_latency(self) -> dict[str, dict[str, float]]:
        """From `edge domains-ssl` returning to the new certificate served (file store)."""
        from benchmarks.updates import measure_updates

        updates = 3 if self.tiny else 20 if self.quick else 100
        system = self.system("edge")
        try:
            result = measure_updates(system, self.certs, self.workdir, updates)
        finally:
            system.stop()
        print(f"  {'certificate updates':<24} edge     {_short(result)}", flush=True)
        out = {"edge": result}
        from benchmarks.updates import measure_etcd_fleet

        try:
            out["edge, 2 nodes on etcd"] = measure_etcd_fleet(self.certs, self.workdir, self.backend.port, updates)
            print(f"  {'certificate updates':<24} etcd x2  {_short(out['edge, 2 nodes on etcd'])}", flush=True)
        except RuntimeError as exc:
            print(f"  certificate updates over etcd skipped: {exc}", file=sys.stderr, flush=True)
        if "nginx" in self.peers:
            from benchmarks.updates import measure_nginx_reload

            nginx = self.system("nginx")
            try:
                out["nginx"] = measure_nginx_reload(nginx, self.certs, self.workdir, min(updates, 20))
            finally:
                nginx.stop()
            print(f"  {'certificate updates':<24} nginx    {_short(out['nginx'])}", flush=True)
        return out

    def many_names(self) -> dict[str, dict[str, float]]:
        from benchmarks.names import run_many_names

        return run_many_names(self)

    def idle_memory(self, h2: bool = False) -> dict[str, dict[str, float]]:
        count = 50 if self.tiny else 1000 if self.quick else 10000

        def run_one(system: System) -> dict[str, float]:
            pids = system.pids()
            time.sleep(0.5)
            before = rss_kib(pids)
            holder = subprocess.Popen(
                ["taskset", "-c", LOAD_CORE, sys.executable, "-m", "benchmarks.idle_clients", "--port",
                 str(system.port), "--count", str(count), *(["--h2"] if h2 else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
            )
            assert holder.stdout is not None and holder.stdin is not None
            line = holder.stdout.readline().split()
            time.sleep(1.0)
            after = rss_kib(system.pids())
            holder.stdin.close()
            holder.wait(60)
            held = int(line[1]) if len(line) > 1 else 0
            return {"connections": held, "failed": int(line[3]) if len(line) > 3 else count,
                    "rss_before_kib": before, "rss_after_kib": after,
                    "kib_per_connection": (after - before) / held if held else float("nan")}

        return self.each_system("idle h2 connections" if h2 else "idle TLS connections", run_one)

    def close(self) -> None:
        self.backend.stop()


def _median(values: list[dict[str, float]]) -> dict[str, float]:
    """Figure by figure, the median over rounds; text (an error message) from the first round."""
    out = {}
    for key, first in values[0].items():
        if isinstance(first, int | float) and all(isinstance(v.get(key), int | float) for v in values):
            out[key] = statistics.median(v[key] for v in values)
        else:
            out[key] = first
    return out


def _short(result: dict[str, float]) -> str:
    keys = ("rate", "per_cpu_s", "p50_ms", "p99_ms", "fixed_p99_ms", "kib_per_connection", "resumed_share",
            "start_s", "rss_mib", "errors")
    return " ".join(f"{k}={result[k]:.1f}" for k in keys if k in result)


SCENARIOS = ["handshakes-ecdsa", "handshakes-rsa", "resumed", "keepalive-small", "keepalive-64k", "h2-small",
             "page-load", "many-names", "update-latency", "idle-memory", "idle-memory-h2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="edge side by side with nginx and HAProxy")
    parser.add_argument("--quick", action="store_true", help="every scenario briefly")
    parser.add_argument("--tiny", action="store_true", help="every scenario for a second (tests)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--peers", default="edge,nginx,haproxy")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("benchmarks need 2 cores: the proxy on one, load and backend on the other", file=sys.stderr)
        return 2
    # 10k idle connections need 10k descriptors in each process: raise the soft
    # limit to the hard one; the children inherit it.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    found, skipped = available_peers()
    peers = [p for p in args.peers.split(",") if p in found]
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    results: dict[str, object] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick or args.tiny,
        "tiny": args.tiny,
        "machine": {"cpu": report.cpu_model(), "cores": os.cpu_count(), "kernel": platform.release(),
                    "python": sys.version.split()[0]},
        "skipped": skipped,
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        run = Run(args.quick, Path(tmp), bench_certificates(), peers, tiny=args.tiny)
        try:
            wanted = args.scenarios.split(",")
            table: dict[str, Callable[[], dict[str, dict[str, float]]]] = {
                "handshakes-ecdsa": lambda: run.handshakes("ecdsa"),
                "handshakes-rsa": lambda: run.handshakes("rsa"),
                "keepalive-small": lambda: run.keepalive("/small"),
                "keepalive-64k": lambda: run.keepalive("/64k"),
                "h2-small": run.h2_small,
                "page-load": run.page_load,
                "resumed": run.resumed,
                "many-names": run.many_names,
                "update-latency": run.update_latency,
                "idle-memory": run.idle_memory,
                "idle-memory-h2": lambda: run.idle_memory(h2=True),
            }
            for scenario in wanted:
                print(f"{scenario}", flush=True)
                results["scenarios"][scenario] = table[scenario]()  # type: ignore[index]
        finally:
            run.close()
        results["versions"] = run.versions
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    paths = report.write(results, args.out)
    print("\n" + paths["md"].read_text())
    print(f"results in {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
