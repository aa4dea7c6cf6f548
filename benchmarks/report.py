"""Benchmark output: a Markdown table with ratios, JSON with every raw figure, a plot."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from benchmarks.systems import cpu_seconds

cpu = cpu_seconds

# scenario -> (figure, label, higher is better)
HEADLINE = {
    "handshakes-ecdsa": ("per_cpu_s", "full handshakes ECDSA P-256, per CPU-second", True),
    "handshakes-rsa": ("per_cpu_s", "full handshakes RSA-2048, per CPU-second", True),
    "resumed": ("per_cpu_s", "resumed handshakes (TLS 1.3 tickets, 2 workers), per CPU-second", True),
    "keepalive-small": ("per_cpu_s", "keep-alive small responses, req per CPU-second", True),
    "keepalive-64k": ("per_cpu_s", "keep-alive 64 KiB responses, req per CPU-second", True),
    "h2-small": ("per_cpu_s", "HTTP/2 small responses (32 conns x 10 streams), req per CPU-second", True),
    "page-load": ("per_cpu_s", "page loads over h2 (new connection, 40 resources), per CPU-second", True),
    "idle-memory": ("kib_per_connection", "memory per idle TLS connection, KiB", False),
    "idle-memory-h2": ("kib_per_connection", "memory per idle HTTP/2 connection, KiB", False),
}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


CEILINGS = ("uvloop-tls", "uvloop-relay", "uvloop-pool")  # references, not proxies: benchmarks/stack_ceiling.py


def _ratio(top: float | None, bottom: float | None) -> str:
    return f"{top / bottom:.2f}x" if top and bottom else "-"


def _headline(results: dict, systems: list[str]) -> list[str]:
    """Each scenario's headline figure per system; edge over every peer, and
    each ceiling over nginx when both ran."""
    pairs = [("edge", s) for s in systems[1:]]
    if "nginx" in systems:
        pairs += [(c, "nginx") for c in CEILINGS if c in systems]
    lines = ["", "| scenario | " + " | ".join(systems) + " | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " |",
             "|---" * (1 + len(systems) + len(pairs)) + "|"]
    for scenario, by_system in results["scenarios"].items():
        if scenario not in HEADLINE:
            continue
        figure, label, _ = HEADLINE[scenario]
        values = [by_system.get(s, {}).get(figure) for s in systems]
        ratios = [_ratio(by_system.get(a, {}).get(figure), by_system.get(b, {}).get(figure)) for a, b in pairs]
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + " | " + " | ".join(ratios) + " |")
    return lines


def _cpu_split(results: dict, systems: list[str]) -> list[str]:
    """Proxy CPU per handshake or request, user and kernel (from /proc utime and stime)."""
    rows = []
    for scenario, by_system in results["scenarios"].items():
        if scenario not in HEADLINE or HEADLINE[scenario][0] != "per_cpu_s":
            continue
        for system in systems:
            r = by_system.get(system, {})
            count = r.get("handshakes", r.get("requests"))
            if "proxy_user_s" not in r or not count:
                continue
            user, kernel = r["proxy_user_s"] / count * 1e6, r["proxy_sys_s"] / count * 1e6
            share = f"{kernel / (user + kernel):.0%}" if user + kernel else "-"
            rows.append(f"| {scenario} | {system} | {user:.1f} | {kernel:.1f} | {user + kernel:.1f} | {share} |")
    if not rows:
        return []
    return ["", "Proxy CPU per handshake (handshake scenarios) or request (keep-alive), µs, from /proc utime and "
            "stime (10 ms ticks: rough on short runs):", "",
            "| scenario | system | user | kernel | total | kernel share |", "|---|---|---|---|---|---|", *rows]


def markdown(results: dict) -> str:
    systems = [s for s in ("edge", "nginx", "haproxy", *CEILINGS)
               if any(s in r for r in results["scenarios"].values())]
    headline = [s for s in results["scenarios"] if s in HEADLINE]
    lines = [
        f"Run {results['started']} ({'quick' if results['quick'] else 'full'}) on {results['machine']['cpu']}, "
        f"{results['machine']['cores']} cores, Linux {results['machine']['kernel']}; proxy pinned to core 0, "
        "load and backend to core 1.",
    ]
    if headline:
        lines += _headline(results, systems)
        lines += _cpu_split(results, systems)
    names = results["scenarios"].get("many-names")
    if names:
        lines += ["", "Many names (SNI drawn uniformly = cold, Zipf = warm; handshakes per CPU-second):", "",
                  "| system @ names | start to first handshake, s | all names loaded, s | RSS loaded, MiB "
                  "| cold /CPU-s | warm /CPU-s | cold p99 ms | errors |", "|---|---|---|---|---|---|---|---|"]
        for key, r in names.items():
            if "error" in r:
                lines.append(f"| {key} | could not load: {r['error']} | | | | | | |")
                continue
            loaded = r.get("loaded_s", r["start_s"])
            lines.append(f"| {key} | {r['start_s']:.2f} | {loaded:.2f} | {r['rss_mib']:.0f} | "
                         f"{_fmt(r['cold_per_cpu_s'])} | {_fmt(r['warm_per_cpu_s'])} | "
                         f"{_fmt(r['cold_p99_ms'])} | {int(r['errors'])} |")
    updates = results["scenarios"].get("update-latency")
    if updates:
        lines += ["", "Certificate update latency, from the command returning to the new certificate served "
                  "(edge: `edge domains-ssl`, file store; edge on etcd: until both nodes serve it; "
                  "nginx: files replaced + `nginx -s reload`):", "",
                  "| system | updates | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
        for system, r in updates.items():
            lines.append(f"| {system} | {r['updates']} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
                         f"{_fmt(r['max_ms'])} |")
    if headline:
        lines += ["", "Wall rates and latency (p50 / p99 / p99.9 ms at a fixed rate of half each system's peak):", ""]
        lines.append("| scenario | system | wall rate/s | p50 | p99 | p99.9 | errors |")
        lines.append("|---|---|---|---|---|---|---|")
    for scenario, by_system in results["scenarios"].items():
        if scenario not in HEADLINE:
            continue
        for system, r in by_system.items():
            if "rate" not in r:
                continue
            lines.append(
                f"| {scenario} | {system} | {_fmt(r['rate'])} | {_fmt(r.get('fixed_p50_ms', r.get('p50_ms')))} | "
                f"{_fmt(r.get('fixed_p99_ms', r.get('p99_ms')))} | {_fmt(r.get('fixed_p999_ms', r.get('p999_ms')))} "
                f"| {int(r.get('errors', 0) + r.get('fixed_errors', 0))} |"
            )
    lines += ["", "Versions: " + "; ".join(results.get("versions", {}).values())]
    if results.get("skipped"):
        lines.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    """Per-CPU rates per scenario and system; start time and RSS against the number of names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = [s for s in results["scenarios"] if s in HEADLINE]
    names = results["scenarios"].get("many-names") or {}
    panels = len(scenarios) + (2 if names else 0)
    if not panels:
        return False
    columns = (panels + 1) // 2 if panels > 4 else panels
    rows = 2 if panels > 4 else 1
    fig, grid = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    axes = [[ax for row in grid for ax in row]]
    for spare in axes[0][panels:]:
        spare.set_visible(False)
    colours = {"edge": "#2a7ab9", "nginx": "#3a9a4a", "haproxy": "#c0603a"}
    for ax, scenario in zip(axes[0], scenarios, strict=False):
        figure, label, _ = HEADLINE[scenario]
        by_system = results["scenarios"][scenario]
        systems = list(by_system)
        ax.bar(systems, [by_system[n].get(figure, 0) or 0 for n in systems],
               color=[colours.get(n, "grey") for n in systems])
        ax.set_title(label, fontsize=7, wrap=True)
        ax.tick_params(labelsize=7)
    if names:
        start_ax, rss_ax = axes[0][len(scenarios)], axes[0][len(scenarios) + 1]
        for system in ("edge", "nginx", "haproxy"):
            points = sorted(
                (r["names"], r) for k, r in names.items() if k.startswith(system + "@") and "error" not in r
            )
            if not points:
                continue
            xs = [p[0] for p in points]
            start_ax.plot(xs, [p[1]["start_s"] for p in points], "o-", label=system, color=colours[system])
            rss_ax.plot(xs, [p[1]["rss_mib"] for p in points], "o-", label=system, color=colours[system])
            if system == "edge":
                start_ax.plot(xs, [p[1].get("loaded_s", p[1]["start_s"]) for p in points], "s--",
                              label="edge, all names loaded", color=colours[system], alpha=0.5)
        for ax, title in ((start_ax, "start to first handshake, s"), (rss_ax, "RSS with every name loaded, MiB")):
            ax.set_xscale("log")
            ax.set_xlabel("names in the store", fontsize=7)
            ax.set_title(title, fontsize=7)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    paths = {"json": out / f"{stamp}.json", "md": out / f"{stamp}.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["md"].write_text(markdown(results))
    png = out / f"{stamp}.png"
    if plot(results, png):
        paths["png"] = png
    for kind, path in list(paths.items()):
        shutil.copyfile(path, out / f"latest.{kind}")
    return paths
