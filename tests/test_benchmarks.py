"""The benchmark suite runs every scenario (in a tiny mode) and writes its
outputs. No speed is judged here: that is what the suite itself reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import require_tool

ROOT = Path(__file__).parents[1]


def test_suite_runs_every_scenario_and_writes_results(tmp_path: Path) -> None:
    for tool in ("nginx", "haproxy", "wrk", "h2load", "taskset"):
        require_tool(tool)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, "stderr:\n" + result.stderr[-4000:] + "\nstdout:\n" + result.stdout[-1500:]
    data = json.loads((tmp_path / "latest.json").read_text())
    scenarios = data["scenarios"]
    assert set(scenarios) == {"handshakes-ecdsa", "handshakes-rsa", "resumed", "keepalive-small", "keepalive-64k",
                              "h2-small", "page-load", "many-names", "update-latency", "idle-memory",
                              "idle-memory-h2"}
    for name in ("handshakes-ecdsa", "handshakes-rsa", "resumed", "keepalive-small", "keepalive-64k", "h2-small"):
        for system in ("edge", "nginx", "haproxy"):
            figures = scenarios[name][system]
            assert figures["per_cpu_s"] > 0 and figures["errors"] == 0, (name, system, figures)
    assert scenarios["resumed"]["edge"]["resumed_share"] > 0.9
    assert scenarios["idle-memory"]["edge"]["connections"] == 50
    assert scenarios["idle-memory-h2"]["edge"]["connections"] == 50
    for system in ("edge", "nginx", "haproxy"):  # a few pages: too little CPU to rate in tiny mode
        page = scenarios["page-load"][system]
        assert page["requests"] == page["pages"] * 40 and page["errors"] == 0, (system, page)
    assert scenarios["update-latency"]["edge"]["updates"] == 3
    assert scenarios["update-latency"]["edge, 2 nodes on etcd"]["updates"] == 3  # scripts/provision.sh installs etcd
    assert scenarios["many-names"]["edge@100"]["loaded_s"] >= scenarios["many-names"]["edge@100"]["start_s"]
    assert "error" not in scenarios["many-names"]["edge@100"]
    markdown = (tmp_path / "latest.md").read_text()
    assert "| scenario | edge | nginx | haproxy | edge/nginx | edge/haproxy |" in markdown
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_index_rows_run_on_both_stores(tmp_path: Path) -> None:
    """benchmarks.shared_index (issue #13's rows) in tiny mode: every row
    measured, the restart with the copy on disk, etcd's database sized."""
    for tool in ("nginx", "etcd", "taskset"):
        require_tool(tool)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.shared_index", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, "stderr:\n" + result.stderr[-4000:] + "\nstdout:\n" + result.stdout[-3000:]
    (report,) = tmp_path.glob("*-shared-index-0k.json")
    data = json.loads(report.read_text())
    rows = {(row["store"], row["workers"]): row for row in data["rows"]}
    assert set(rows) == {(s, w) for s in ("file", "etcd") for w in ("1", "2", "auto")}
    for (_store, workers), row in rows.items():
        assert row["processes"] == (1 if workers == "1" else 3), row  # auto: both cores, so 2 workers
        assert row["first_s"] <= row["loaded_s"] <= row["copy_written_s"], row
        assert row["restart_first_s"] > 0 and row["restart_first_s"] <= row["restart_loaded_s"], row
        assert row["pss_loaded_mib"] == pytest.approx(sum(row["pss_loaded_each_mib"]))
        assert row["cold_errors"] == 0 and row["cold_per_cpu_s"] > 0, row
    sizes = data["etcd"]
    assert sizes["entries"] == 201 and sizes["db_loaded_mib"] >= sizes["db_empty_mib"] > 0
    assert set(sizes["per_name_by_bundle_size"]) == {"1000", "2000", "3000", "4000", "6000"}
    assert "| etcd | 2 | 3 |" in (tmp_path / report.name.replace(".json", ".md")).read_text()
