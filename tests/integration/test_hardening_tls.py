"""Hardening of the TLS accept path (issue #11): what one client can make edge spend."""

from __future__ import annotations

import pytest

from tests.integration.conftest import EdgeProcess, require_tool

# --- #11.2: key exchange groups ------------------------------------------------------


_TEMP_KEY = {"X25519": "X25519", "P-256": "prime256v1", "P-384": "secp384r1"}


def _groups(version: str, groups: str) -> str:
    # TLS 1.2 (RFC 8422 §5.1): an ECDSA P-256 certificate needs P-256 among the
    # client's groups, so it is listed last; clients' order wins (no server preference).
    return groups if version == "-tls1_3" or groups == "P-256" else f"{groups}:P-256"


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384"])
def test_cheap_groups_are_offered(edge: EdgeProcess, version: str, group: str) -> None:
    require_tool("openssl")
    result = edge.openssl("-servername", "demo.edge.test", version, "-groups", _groups(version, group))
    assert f"Server Temp Key: {'ECDH, ' if group != 'X25519' else ''}{_TEMP_KEY[group]}" in result.stdout, \
        result.stdout


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
@pytest.mark.parametrize("group", ["ffdhe2048", "ffdhe8192", "P-521"])
def test_costly_groups_are_refused(edge: EdgeProcess, version: str, group: str) -> None:
    """A client choosing ffdhe8192 made edge spend ~91 ms of event-loop CPU on
    one handshake (X25519: 0.3 ms); P-521 ~3x P-384. None is offered: with
    only that group the handshake fails, with P-256 after it P-256 is used."""
    require_tool("openssl")
    alone = edge.openssl("-servername", "demo.edge.test", version, "-groups", group)
    assert "Cipher is (NONE)" in alone.stdout, alone.stdout
    assert "Server Temp Key" not in alone.stdout
    fallback = edge.openssl("-servername", "demo.edge.test", version, "-groups", f"{group}:P-256")
    assert "Server Temp Key: ECDH, prime256v1" in fallback.stdout, fallback.stdout


def test_tls12_dhe_suites_are_refused(edge: EdgeProcess) -> None:
    require_tool("openssl")
    result = edge.openssl("-servername", "demo.edge.test", "-tls1_2", "-cipher",
                          "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305")
    assert "Cipher is (NONE)" in result.stdout, result.stdout
