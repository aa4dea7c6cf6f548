"""deploy/ checked by what can run here: the systemd unit verified, the YAML
parsed with its required fields, the Dockerfile's instructions, the configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from edge import config

DEPLOY = Path(__file__).parents[1] / "deploy"


def test_systemd_unit_verifies_and_is_hardened() -> None:
    text = (DEPLOY / "edge.service").read_text()
    for setting in ("User=edge", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "NoNewPrivileges=true",
                    "ProtectSystem=strict", "PrivateTmp=true", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert setting in text, setting
    assert shutil.which("systemd-analyze") is not None, "systemd-analyze is missing: scripts/provision.sh installs it"
    # The unit as shipped, verified the way OPERATIONS.md tells operators to
    # (verify needs ExecStart's binary at /opt/edge): the documented command, run here.
    guide = (DEPLOY / "OPERATIONS.md").read_text()
    commands = [line for line in guide.splitlines() if line.startswith("unshare -rm sh -c") and "verify" in line]
    assert len(commands) == 1, "OPERATIONS.md shows how to verify deploy/edge.service"
    result = subprocess.run(["sh", "-c", commands[0]], cwd=DEPLOY.parent, capture_output=True, text=True,
                            env={**os.environ, "PWD": str(DEPLOY.parent)})
    assert result.returncode == 0, result.stderr


def test_kubernetes_manifests(monkeypatch) -> None:
    monkeypatch.setenv("EDGE_ADMIN_TOKEN", "from-the-secret")  # as the DaemonSet sets it
    docs = [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert {"DaemonSet", "ConfigMap", "Secret"} <= set(kinds)
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"] and doc["metadata"]["namespace"] == "edge"
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {p["hostPort"] for p in container["ports"] if "hostPort" in p} == {443, 80}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert any(e["name"] == "EDGE_ADMIN_TOKEN" for e in container["env"])
    # The ConfigMap holds a configuration edge accepts.
    toml_text = kinds["ConfigMap"]["data"]["edge.toml"]
    cfg = config.parse(toml_text, Path("/etc/edge/edge.toml"))
    assert cfg.server.admin is not None and cfg.store.backend == "etcd"
    # Prometheus scrapes where /metrics answers without the admin token: [server] metrics.
    annotations = kinds["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and cfg.server.admin_token
    assert cfg.server.metrics is not None and cfg.server.metrics.port != cfg.server.admin.port
    assert int(annotations["prometheus.io/port"]) == cfg.server.metrics.port == ports["metrics"]
    assert ports["admin"] == cfg.server.admin.port


def test_prometheus_alerts_and_grafana_dashboard() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yaml").read_text())["groups"][0]["rules"]
    assert all({"alert", "expr"} <= set(rule) for rule in rules)
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("edge_requests_total", "edge_handshakes_total", "edge_certificate_nearest_expiry_days",
                   "edge_upstream_errors_total", "edge_tls_context_cache_size", "edge_acme_orders_total"):
        assert metric in exprs, metric


def test_dockerfile_parses_runs_as_non_root_with_a_healthcheck() -> None:
    import dockerfile  # Docker's own parser (buildkit), so a syntax error fails here

    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    names = [c.cmd for c in commands]
    assert names[0] == "FROM" and "slim" in commands[0].value[0]
    user = next(c for c in commands if c.cmd == "USER")
    assert user.value[0] not in ("root", "0")
    assert names.index("USER") < names.index("ENTRYPOINT")
    assert "HEALTHCHECK" in names and "EXPOSE" in names


def test_production_config_is_valid() -> None:
    cfg = config.load(DEPLOY / "edge.toml")
    assert cfg.platform.dev_certificates is False and cfg.server.https[0].port == 443
