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
