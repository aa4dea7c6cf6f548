"""Load generators, run pinned to the load core, and what they report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.systems import BENCH_HOST, LOAD_CORE

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(port: int, path: str, connections: int, duration: float) -> dict[str, float]:
    """Keep-alive throughput: wrk, one thread, HTTPS to 127.0.0.1 with Host set."""
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
         "-H", f"Host: {BENCH_HOST}", f"https://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=duration + 60,
    ).stdout
    requests = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if requests is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    result = {
        "requests": int(requests.group(1)),
        "rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "errors": int(errors.group(1)) if errors else 0,
    }
    if socket_errors:
        result["errors"] += sum(int(x) for x in socket_errors.groups())
    for q in ("50", "99"):
        match = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        if match:
            result[f"p{q}_ms"] = _ms(match.group(1))
    return result


def h2load_fixed_rate(port: int, path: str, rate: float, connections: int, duration: float,
                      log_file: Path) -> dict[str, float]:
    """Latency at a fixed request rate (h2load --rps per connection), from its per-request log."""
    per_connection = max(1, round(rate / connections))
    subprocess.run(
        ["taskset", "-c", LOAD_CORE, "h2load", "--h1", "-c", str(connections), "--rps", str(per_connection),
         "-D", str(int(duration)), "-H", f":authority: {BENCH_HOST}", "--log-file", str(log_file),
         f"https://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=duration + 60, check=True,
    )
    latencies = []
    bad = 0
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            latencies.append(int(parts[2]) / 1000.0)  # microseconds -> ms
            bad += not parts[1].startswith("2")
    latencies.sort()

    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, round(p * (len(latencies) - 1)))] if latencies else float("nan")

    return {"requests": len(latencies), "rate": len(latencies) / duration, "errors": bad,
            "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999)}


def handshakes(port: int, names_file: Path, duration: float, procs: int, zipf: bool = False,
               resume: bool = False) -> dict[str, float]:
    """Handshakes (full, or resumed from a ticket), one request each, over the names in ``names_file``."""
    argv = ["taskset", "-c", LOAD_CORE, sys.executable, "-m", "benchmarks.handshake_load", "--port", str(port),
            "--names-file", str(names_file), "--duration", str(duration), "--procs", str(procs)]
    if zipf:
        argv.append("--zipf")
    if resume:
        argv.append("--resume")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120,
                         cwd=Path(__file__).parent.parent)
    if out.returncode != 0:
        raise RuntimeError(f"handshake_load failed: {out.stderr}")
    result = json.loads(out.stdout)
    result["errors"] = result.pop("failures")
    return result


def _h2load_counts(out: str) -> tuple[int, int]:
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if done is None:
        raise RuntimeError(f"h2load printed no result:\n{out[-2000:]}")
    return int(done.group(2)), int(done.group(3)) + int(done.group(1)) - int(done.group(2))


def h2load(port: int, path: str, connections: int, streams: int, duration: float, h1: bool = False) -> dict[str, float]:
    """Keep-alive throughput over HTTP/2 (``streams`` concurrent per connection), or HTTP/1.1 with ``h1``."""
    argv = ["taskset", "-c", LOAD_CORE, "h2load", "-c", str(connections), "-m", str(streams),
            "-D", str(max(1, int(duration))), "-H", f":authority: {BENCH_HOST}", f"https://127.0.0.1:{port}{path}"]
    if h1:
        argv.insert(4, "--h1")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    ok, bad = _h2load_counts(out)
    return {"requests": ok, "rate": ok / duration, "errors": bad}


def page_loads(port: int, pages: int, resources: int, h1: bool) -> dict[str, float]:
    """``pages`` page loads, each a new connection (a full handshake) fetching
    ``resources`` small answers: over one HTTP/2 connection (all at once), or
    over six HTTP/1.1 connections (as browsers do)."""
    ok = bad = 0
    for _ in range(pages):
        argv = ["taskset", "-c", LOAD_CORE, "h2load", "-n", str(resources), "-H", f":authority: {BENCH_HOST}",
                f"https://127.0.0.1:{port}/small"]
        argv[4:4] = ["--h1", "-c", "6", "-m", "1"] if h1 else ["-c", "1", "-m", str(resources)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
        good, failed = _h2load_counts(out)
        ok += good
        bad += failed
    return {"pages": pages, "requests": ok, "errors": bad}

