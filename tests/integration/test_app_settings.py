"""Per-app settings through the CLI and the admin API (issue #14): HSTS,
maintenance, error pages. They live in the app record and survive apps-add."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import EdgeProcess
from tests.integration.test_admin import admin_edge, call  # noqa: F401 - the fixture, reused

PAGE = "<html><body><h1>Back soon</h1><p>Wartung — bientôt</p></body></html>\n"


@pytest.fixture
def cli_edge(tmp_path: Path, backend: str) -> EdgeProcess:
    process = EdgeProcess(tmp_path / "edge")  # the CLI works on the store alone: no server needed
    process.cli("apps-add", "shop", "--backend", backend)
    return process


def app_row(edge: EdgeProcess, name: str) -> dict:
    return next(row for row in json.loads(edge.cli("apps", "--json").stdout) if row["app"] == name)


def test_hsts_flags(cli_edge: EdgeProcess, backend: str) -> None:
    assert app_row(cli_edge, "shop")["hsts"] is None
    cli_edge.cli("apps-add", "shop", "--backend", backend, "--hsts", "31536000", "--hsts-subdomains")
    assert app_row(cli_edge, "shop")["hsts"] == "max-age=31536000; includeSubDomains"
    cli_edge.cli("apps-add", "shop", "--backend", backend)  # flags not given: kept
    assert app_row(cli_edge, "shop")["hsts"] == "max-age=31536000; includeSubDomains"
    result = cli_edge.cli("apps-add", "shop", "--backend", backend, "--hsts", "600", "--hsts-preload")
    assert "preload" in result.stderr and app_row(cli_edge, "shop")["hsts"] == "max-age=600; preload"
    cli_edge.cli("apps-add", "shop", "--backend", backend, "--no-hsts")
    assert app_row(cli_edge, "shop")["hsts"] is None
    refused = cli_edge.cli("apps-add", "shop", "--backend", backend, "--hsts-subdomains", check=False)
    assert refused.returncode == 1 and "--hsts SECONDS" in refused.stderr


def test_maintenance_flags(cli_edge: EdgeProcess, backend: str) -> None:
    result = cli_edge.cli("apps-add", "shop", "--backend", backend, "--maintenance")
    assert "maintenance" in result.stdout and app_row(cli_edge, "shop")["maintenance"] is True
    cli_edge.cli("apps-add", "shop", "--backend", backend, "--hsts", "60")
    assert app_row(cli_edge, "shop")["maintenance"] is True
    cli_edge.cli("apps-add", "shop", "--backend", backend, "--no-maintenance")
    assert app_row(cli_edge, "shop")["maintenance"] is False


def test_error_pages_validated_set_and_removed(cli_edge: EdgeProcess, backend: str, tmp_path: Path) -> None:
    page = tmp_path / "503.html"
    page.write_text(PAGE, encoding="utf-8")
    cli_edge.cli("apps-error-page", "shop", str(page), "--status", "503")
    assert app_row(cli_edge, "shop")["error_pages"] == [503]
    cli_edge.cli("apps-add", "shop", "--backend", backend)
    assert app_row(cli_edge, "shop")["error_pages"] == [503]  # kept across apps-add
    big = tmp_path / "big.html"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    latin = tmp_path / "latin.html"
    latin.write_bytes("<p>caf\u00e9</p>".encode("latin-1"))
    for path, status, message in ((big, "502", "64 KiB"), (latin, "502", "not UTF-8"), (page, "500", "invalid choice")):
        refused = cli_edge.cli("apps-error-page", "shop", str(path), "--status", status, check=False)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
    missing = cli_edge.cli("apps-error-page", "nope", str(page), "--status", "503", check=False)
    assert missing.returncode == 1 and "no app named" in missing.stderr
    cli_edge.cli("apps-error-page", "shop", "--status", "503", "--remove")
    assert app_row(cli_edge, "shop")["error_pages"] == []


def test_admin_api_equivalents(admin_edge: EdgeProcess, backend: str) -> None:  # noqa: F811
    body = {"app": "adm", "backends": [backend], "hsts": {"max_age": 300, "include_subdomains": True},
            "maintenance": True}
    assert call(admin_edge, "POST", "/v1/apps", body)[0] == 201
    row = next(a for a in call(admin_edge, "GET", "/v1/apps")[1] if a["app"] == "adm")  # type: ignore[union-attr]
    assert row["hsts"] == "max-age=300; includeSubDomains" and row["maintenance"] is True
    assert call(admin_edge, "PUT", "/v1/apps/adm/error-pages/504", {"html": PAGE})[0] == 200
    assert call(admin_edge, "PUT", "/v1/apps/adm/error-pages/500", {"html": PAGE})[0] == 400
    assert call(admin_edge, "PUT", "/v1/apps/adm/error-pages/502", {"html": "x" * 70000})[0] == 400
    assert call(admin_edge, "PUT", "/v1/apps/zzz/error-pages/502", {"html": PAGE})[0] == 404
    assert call(admin_edge, "POST", "/v1/apps", {"app": "adm", "backends": [backend], "hsts": None,
                                                 "maintenance": False})[0] == 201
    row = next(a for a in call(admin_edge, "GET", "/v1/apps")[1] if a["app"] == "adm")  # type: ignore[union-attr]
    assert row["hsts"] is None and row["maintenance"] is False and row["error_pages"] == [504]
    assert call(admin_edge, "DELETE", "/v1/apps/adm/error-pages/504")[0] == 200
