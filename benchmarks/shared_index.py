"""The shared index's rows (issue #13): memory and restart at many names, on
the file store and on etcd, for ``workers = 1``, ``2`` and ``"auto"``.

    python -m benchmarks.shared_index                 # 100k names, file + etcd, workers 1, 2, auto (~15 min)
    python -m benchmarks.shared_index --quick         # 10k names, shorter handshake runs (~4 min)
    python -m benchmarks.shared_index --names 1000000 --stores file --workers 2

Each row starts edge on an empty local copy, then once more with the copy
on disk and the store unchanged (the restart). Figures:

- ``first_s``: start to the first handshake that gets a random name's own certificate;
- ``loaded_s``: start to ``/healthz`` saying ``"index": "loaded"`` (every name in the index);
- ``copy_written_s``: start to the local copy committed (its LMDB file holds every entry).
  The restart is measured only after this: stopped earlier, the copy is still
  empty and the "restart" is a first start again (what made earlier runs
  report 3.8-6.1 s for a 1 s restart);
- ``pss_loaded_mib``: PSS summed over every process (supervisor and workers,
  ``/proc/PID/smaps_rollup``), once loaded and caught up, before any handshake;
- ``pss_cold_mib``: the same after a uniform (cold) handshake run over every name,
  so it includes each worker's TLS context cache;
- ``restart_first_s``, ``restart_loaded_s``: as above, the copy on disk;
  ``restart_caught_up_s``: until ``/healthz`` no longer says ``"stale copy"``
  (the file store is re-read, etcd's watch resumes); ``pss_restart_mib`` then.

With etcd: its database size (``dbSize`` from etcd's status) empty, after the
import of every bundle, after every bundle is written once more (a renewal
wave, no compaction) and after compaction and defragmentation, per bundle.

``auto`` is the number of cores edge may run on: edge runs on both cores
here (``taskset -c 0,1``) so that ``auto`` means 2; rows 1 and 2 run on core 0.
The handshake load runs on core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import load
from benchmarks.certs import bench_certificates, many_names
from benchmarks.names import _first_handshake, copy_entries, pss_kib
from benchmarks.systems import EDGE_BIN, LOAD_CORE, PROXY_CORE, Backend, edge_conf, free_port, process_tree, wait_port

RESULTS = Path(__file__).parent / "results"
PREFIX = "/bench/"
TXN_OPS = 128  # etcd's default --max-txn-ops


def _get(url: str, timeout: float = 5.0) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except OSError:  # refused, or 503 while unhealthy
        return None


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> float:  # type: ignore[no-untyped-def]
    """Poll ``check`` every 50 ms; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"edge exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic()


class Etcd:
    """One etcd member on the load core, and its JSON gateway for status, compaction, defragmentation."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        client, peer = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{client}"
        root = workdir / "etcd"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        self.log = open(root / "etcd.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["taskset", "-c", LOAD_CORE, binary, "--data-dir", str(root / "data"), "--name", "bench",
             "--listen-client-urls", f"http://{self.endpoint}", "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
             f"http://127.0.0.1:{peer}", "--initial-cluster", f"bench=http://127.0.0.1:{peer}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(client, proc=self.proc)

    def call(self, path: str, body: dict[str, object]) -> dict[str, object]:
        request = urllib.request.Request(f"http://{self.endpoint}/v3/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def db_size(self) -> int:
        """The database file's size; after etcd's backend commit interval (100 ms), so recent writes count."""
        time.sleep(1.0)
        return int(self.call("maintenance/status", {})["dbSize"])  # type: ignore[call-overload]

    def fill(self, store_dir: Path) -> tuple[int, float]:
        """Every entry of the file store at ``store_dir`` put under ``PREFIX``, in
        transactions of ``TXN_OPS`` puts; (entries, seconds)."""
        from edge.store.file import FileStore

        async def read() -> list[tuple[str, bytes]]:
            return [item async for item in FileStore(store_dir).snapshot()]

        items = asyncio.run(read())
        started = time.monotonic()
        for start in range(0, len(items), TXN_OPS):
            self.call("kv/txn", {"success": [
                {"requestPut": {"key": base64.b64encode((PREFIX + k).encode()).decode(),
                                "value": base64.b64encode(v).decode()}}
                for k, v in items[start : start + TXN_OPS]]})
        return len(items), time.monotonic() - started

    def compact_and_defrag(self) -> None:
        revision = int(self.call("kv/range", {"key": base64.b64encode(b"x").decode()})["header"]["revision"])  # type: ignore[index]
        self.call("kv/compaction", {"revision": revision, "physical": True})
        self.call("maintenance/defragment", {})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def etcd_sizes(etcd: Etcd, store_dir: Path, names: int) -> dict[str, float]:
    """etcd's database: empty, with every bundle, after a renewal wave, compacted."""
    empty = etcd.db_size()
    entries, seconds = etcd.fill(store_dir)
    loaded = etcd.db_size()
    etcd.fill(store_dir)  # every bundle written again: the old revisions stay until compacted
    renewed = etcd.db_size()
    etcd.compact_and_defrag()
    compacted = etcd.db_size()
    mib = 1 << 20
    return {"names": names, "entries": entries, "import_s": seconds, "db_empty_mib": empty / mib,
            "db_loaded_mib": loaded / mib, "db_after_renewal_mib": renewed / mib,
            "db_compacted_mib": compacted / mib, "bytes_per_bundle": (loaded - empty) / names,
            "renewal_bytes_per_bundle": (renewed - loaded) / names,
            "db_1m_bundles_gib": (loaded - empty) / names * 1_000_000 / (1 << 30)}


def etcd_value_sizes(etcd: Etcd, names: int = 10_000,
                     sizes: tuple[int, ...] = (1000, 2000, 3000, 4000, 6000)) -> dict[str, float]:
    """etcd database bytes per name (a domain entry and one bundle) by bundle
    size: bbolt packs values into 4 KiB pages, so the cost is not linear in the
    bundle's size. Real bundles: Let's Encrypt ECDSA leaf + intermediate + key
    ~2.8 KB, RSA-2048 ~5.5 KB; the benchmark's own (no intermediate) ~1 KB."""
    import os as _os

    out = {}
    for size in sizes:
        before = etcd.db_size()
        for start in range(0, names, TXN_OPS // 2):
            ops = []
            for i in range(start, min(start + TXN_OPS // 2, names)):
                name = f"s{size}-{i}.sizes.example.test"
                for key, value in ((f"domains/{name}", b'{"app": "bench"}\n'),
                                   (f"certs/custom-ecdsa/{name}", _os.urandom(size))):
                    ops.append({"requestPut": {"key": base64.b64encode(f"/sizes/{key}".encode()).decode(),
                                               "value": base64.b64encode(value).decode()}})
            etcd.call("kv/txn", {"success": ops})
        out[str(size)] = (etcd.db_size() - before) / names
    return out


class Node:
    """One edge under test: started, timed, measured, stopped."""

    def __init__(self, config: Path, port: int, admin_port: int, cores: str, log: Path) -> None:
        self.config, self.port, self.admin_port, self.cores, self.log = config, port, admin_port, cores, log
        self.proc: subprocess.Popen[bytes] | None = None

    def health(self) -> dict[str, object]:
        return _get(f"http://127.0.0.1:{self.admin_port}/healthz") or {}

    def start(self, names: list[str], entries: int, index_dir: Path) -> dict[str, float]:
        """Start; seconds to the first handshake, every name loaded, the copy
        committed, the store caught up (``/healthz`` no longer "stale copy")."""
        with open(self.log, "ab") as out:
            began = time.monotonic()
            self.proc = subprocess.Popen(["taskset", "-c", self.cores, EDGE_BIN, "serve", "--config",
                                          str(self.config)], stdout=out, stderr=subprocess.STDOUT)
        proc = self.proc
        try:
            first = _first_handshake(self.port, names, proc, 900)
            loaded = wait_until(self.loaded_now, 900, "every name loaded", proc)
            written = wait_until(lambda: copy_entries(index_dir) >= entries, 900, "the copy written", proc)
            caught_up = wait_until(lambda: self.health().get("store") == "loaded", 900, "caught up", proc)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{self.log.read_text()[-1500:]}") from None
        return {"first_s": first, "loaded_s": loaded - began, "copy_written_s": written - began,
                "caught_up_s": caught_up - began}

    def loaded_now(self) -> bool:
        """Every name loaded; an error when edge keeps failing to load the store
        (it retries for ever, serving names read on demand meanwhile)."""
        text = self.log.read_text(errors="replace")
        if text.count("loading the store failed") >= 3:
            line = text[text.rindex("loading the store failed"):].splitlines()[0]
            raise RuntimeError(f"edge keeps failing to load the store: {line}")
        return self.health().get("index") == "loaded"

    def pss(self) -> tuple[float, list[float]]:
        """PSS summed over every process, MiB, and each process's (supervisor first)."""
        assert self.proc is not None
        each = [pss_kib([pid]) / 1024 for pid in process_tree(self.proc.pid)]
        return sum(each), each

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                for pid in process_tree(self.proc.pid):
                    subprocess.run(["kill", "-9", str(pid)], check=False)
                self.proc.wait()
        self.proc = None


def run_row(store: str, workers: str, names_dir: Path, workdir: Path, backend_port: int, duration: float,
            etcd: Etcd | None) -> dict[str, object]:
    root = workdir / f"{store}-w{workers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if etcd is None:  # hard links: the cached store, without copying gigabytes
        subprocess.run(["cp", "-al", str(names_dir / "store"), str(root / "store")], check=True)
        bench_app(root / "store", backend_port)
    port, admin_port = free_port(), free_port()
    workers_value = '"auto"' if workers == "auto" else int(workers)
    config = edge_conf(root, port, workers=workers_value, admin_port=admin_port,  # type: ignore[arg-type]
                       etcd=etcd.endpoint if etcd else None)
    names = (names_dir / "names.txt").read_text().split()
    entries = 2 * len(names) + 1  # a domain and a certificate per name, and the app
    index_dir = root / ("var/index" if etcd else "index")  # [store] index_path's default: beside the store
    node = Node(config, port, admin_port, "0,1" if workers == "auto" else PROXY_CORE, root / "edge.log")
    row: dict[str, object] = {"store": store, "workers": workers, "names": len(names)}
    try:
        row.update(node.start(names, entries, index_dir))
        row["processes"] = len(process_tree(node.proc.pid))  # type: ignore[union-attr]
        time.sleep(1.0)  # the writer releases its pages after the commit
        row["pss_loaded_mib"], row["pss_loaded_each_mib"] = node.pss()
        pids = process_tree(node.proc.pid)  # type: ignore[union-attr]
        cpu = load_cpu(pids)
        cold = load.handshakes(port, names_dir / "names.txt", duration, 8)
        cpu = load_cpu(pids) - cpu
        row.update({"cold_rate": cold["rate"], "cold_per_cpu_s": cold["handshakes"] / cpu if cpu else 0.0,
                    "cold_errors": cold["errors"]})
        row["pss_cold_mib"], row["pss_cold_each_mib"] = node.pss()
        node.stop()
        again = node.start(names, entries, index_dir)
        row.update({"restart_first_s": again["first_s"], "restart_loaded_s": again["loaded_s"],
                    "restart_caught_up_s": again["caught_up_s"]})
        time.sleep(1.0)
        row["pss_restart_mib"], row["pss_restart_each_mib"] = node.pss()
    except RuntimeError as exc:
        row["error"] = str(exc)
    finally:
        node.stop()
    return row


def load_cpu(pids: list[int]) -> float:
    from benchmarks.systems import cpu_seconds

    return cpu_seconds(pids)


def bench_app(store: Path, backend_port: int) -> None:
    (store / "apps").mkdir(exist_ok=True)
    (store / "apps" / "bench.json").write_text(f'{{"backends": ["127.0.0.1:{backend_port}"], "force_https": true}}\n')


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
    return str(value)


def markdown(results: dict[str, object]) -> str:
    rows: list[dict[str, object]] = results["rows"]  # type: ignore[assignment]
    lines = [f"Run {results['started']} ({results['mode']}) on {results['machine']}; {results['command']}", "",
             "Shared index (issue #13): PSS summed over every process (supervisor + workers), MiB; times from "
             "start, s.", "",
             "| store | workers | processes | first handshake | every name loaded | copy written | PSS loaded "
             "(each) | PSS after cold run | cold /CPU-s | restart: first handshake | restart: every name loaded "
             "| restart: caught up | PSS after restart |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['store']} | {row['workers']} | error: {str(row['error']).splitlines()[0]} |")
            continue
        each = " + ".join(f"{v:.0f}" for v in row["pss_loaded_each_mib"])  # type: ignore[attr-defined]
        lines.append("| " + " | ".join([
            str(row["store"]), str(row["workers"]), str(row["processes"]), _fmt(row["first_s"]),
            _fmt(row["loaded_s"]), _fmt(row["copy_written_s"]), f"{_fmt(row['pss_loaded_mib'])} ({each})",
            _fmt(row["pss_cold_mib"]), _fmt(row["cold_per_cpu_s"]), _fmt(row["restart_first_s"]),
            _fmt(row["restart_loaded_s"]), _fmt(row["restart_caught_up_s"]), _fmt(row["pss_restart_mib"])]) + " |")
    sizes = results.get("etcd")
    if isinstance(sizes, dict):
        lines += ["", f"etcd {results.get('etcd_version', '')} database (`dbSize`), {sizes['names']:,} bundles "
                  f"({sizes['entries']:,} keys, imported in {sizes['import_s']:.1f} s):", "",
                  "| empty | every bundle | after a renewal wave (not compacted) | compacted + defragmented | "
                  "bytes per bundle | a renewal adds per bundle | 1M bundles (extrapolated) |",
                  "|---|---|---|---|---|---|---|",
                  f"| {sizes['db_empty_mib']:.1f} MiB | {sizes['db_loaded_mib']:.0f} MiB | "
                  f"{sizes['db_after_renewal_mib']:.0f} MiB | {sizes['db_compacted_mib']:.0f} MiB | "
                  f"{sizes['bytes_per_bundle']:,.0f} | {sizes['renewal_bytes_per_bundle']:,.0f} | "
                  f"{sizes['db_1m_bundles_gib']:.2f} GiB |"]
        by_size = sizes.get("per_name_by_bundle_size", {})
        if by_size:
            lines += ["", "etcd database bytes per name (a domain entry and one bundle) by bundle size: " +
                      ", ".join(f"{int(k):,} B: {v:,.0f}" for k, v in by_size.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="memory and restart of edge's shared index (issue #13)")
    parser.add_argument("--quick", action="store_true", help="10k names, 3 s handshake runs")
    parser.add_argument("--tiny", action="store_true", help="100 names, 1 s (tests)")
    parser.add_argument("--names", type=int, default=None, help="default 100000 (quick: 10000)")
    parser.add_argument("--stores", default="file,etcd")
    parser.add_argument("--workers", default="1,2,auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    count = args.names or (100 if args.tiny else 10_000 if args.quick else 100_000)
    duration = 1.0 if args.tiny else 3.0 if args.quick else 10.0
    from benchmarks import report

    results: dict[str, object] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "machine": f"{report.cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores",
        "command": "python -m benchmarks.shared_index " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": [],
    }
    names_dir = many_names(count)
    with tempfile.TemporaryDirectory(prefix="edge-bench-index-") as tmp:
        workdir = Path(tmp)
        backend = Backend("backend", workdir, 0, bench_certificates())
        backend.start()
        try:
            for store in args.stores.split(","):
                etcd = None
                if store == "etcd":
                    etcd = Etcd(workdir)
                    source = workdir / "etcd-source"
                    subprocess.run(["cp", "-al", str(names_dir / "store"), str(source)], check=True)
                    bench_app(source, backend.port)
                    results["etcd_version"] = subprocess.run(["etcd", "--version"], capture_output=True,
                                                             text=True).stdout.split()[2]
                    results["etcd"] = etcd_sizes(etcd, source, count)
                    results["etcd"]["per_name_by_bundle_size"] = etcd_value_sizes(  # type: ignore[index]
                        etcd, 100 if args.tiny else 10_000)
                    print(f"  etcd: {json.dumps(results['etcd'])}", flush=True)
                try:
                    for workers in args.workers.split(","):
                        row = run_row(store, workers, names_dir, workdir, backend.port, duration, etcd)
                        results["rows"].append(row)  # type: ignore[attr-defined]
                        print(f"  {store} workers={workers}: " + json.dumps(row), flush=True)
                finally:
                    if etcd is not None:
                        etcd.stop()
        finally:
            backend.stop()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime())
    base = args.out / f"{stamp}-shared-index-{count // 1000}k"
    base.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    base.with_suffix(".md").write_text(text)
    print("\n" + text + f"\nresults in {base}.md, {base}.json")
    return 1 if any("error" in r for r in results["rows"]) else 0  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
