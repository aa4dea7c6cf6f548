"""Pebble, the ACME test server, and pebble-challtestsrv as its DNS, for real.

Pebble validates challenges by connecting to the name's address on the
ports it is configured with; challtestsrv answers every name with
127.0.0.1 (and no IPv6 address), so Pebble reaches the edge under test on
``http_port`` (HTTP-01) and ``tls_port`` (TLS-ALPN-01).

The Pebble used is the current one, with ARI (RFC 9773) and profiles, from
``../shared/tools/pebble/`` beside the repository (``EDGE_PEBBLE_DIR``
overrides). ``debian=True`` runs Debian's pebble 2.4 instead: a CA without
``renewalInfo`` and without profiles.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import trustme

from tests.integration.conftest import free_port, require_tool

DAY = 86400
PROFILES = {"default": 90 * DAY, "shortlived": 6 * DAY}  # as Pebble's shipped config


def pebble_dir() -> Path:
    """The current Pebble's directory: ``$EDGE_PEBBLE_DIR`` or ``<repo>/../shared/tools/pebble``."""
    override = os.environ.get("EDGE_PEBBLE_DIR")
    where = Path(override) if override else Path(__file__).resolve().parents[3] / "shared" / "tools" / "pebble"
    if not (where / "pebble").is_file():
        raise AssertionError(f"no Pebble at {where}: the current Pebble (ARI, profiles) is expected in "
                             "../shared/tools/pebble beside the repository, or set EDGE_PEBBLE_DIR")
    return where


def _toml(value: object) -> str:
    """A TOML value: JSON's scalars and arrays, inline tables for dicts."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


class Pebble:
    def __init__(self, root: Path, *, validity: int | None = None, nonce_reject: int = 0,
                 debian: bool = False, profiles: tuple[str, ...] = ("default",),
                 validates: Pebble | None = None, authz_reuse: int = 0) -> None:
        """``validates``: validate challenges on the same ports as that Pebble (one edge, two CAs);
        ``authz_reuse``: the percentage of orders that reuse the account's valid authorization
        for a name (RFC 8555 §7.1.4) instead of validating it again."""
        self.root = root
        self.debian = debian
        root.mkdir(parents=True, exist_ok=True)
        self.http_port, self.tls_port = (validates.http_port, validates.tls_port) if validates else (
            free_port(), free_port())
        self.acme_port, self.management_port = free_port(), free_port()
        self.dns_port, self.dns_management_port = free_port(), free_port()
        # Pebble's own HTTPS certificate, from a CA edge is told to trust (ca_bundle).
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        leaf.private_key_pem.write_to_path(str(root / "key.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
        self.ca_bundle = root / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_bundle))
        self._client_ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        settings: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(root / "cert.pem"),
            "privateKey": str(root / "key.pem"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if debian:
            if validity is not None:
                settings["certificateValidityPeriod"] = validity
        else:
            # Pebble gives an order without a profile a random one: offer one unless told.
            periods = dict(PROFILES, default=validity or PROFILES["default"])
            settings["profiles"] = {name: {"description": name, "validityPeriod": periods[name]}
                                    for name in profiles}
        (root / "pebble.json").write_text(json.dumps({"pebble": settings}))
        self.env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_AUTHZREUSE=str(authz_reuse),
                        PEBBLE_WFE_NONCEREJECT=str(nonce_reject))
        self.procs: list[subprocess.Popen[bytes]] = []
        self._root: bytes | None = None

    @property
    def directory(self) -> str:
        return f"https://localhost:{self.acme_port}/dir"

    def edge_config(self, **acme: object) -> str:
        """The ``[acme]`` table pointing an edge at this Pebble."""
        settings = {"enabled": True, "directory": self.directory, "ca_bundle": str(self.ca_bundle),
                    "backoff_min": 2, **acme}
        return "[acme]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())

    def listen_config(self, text: str) -> str:
        """An EdgeProcess config rewritten to listen where Pebble validates."""
        return (text.replace('https = ["127.0.0.1:0"]', f'https = ["127.0.0.1:{self.tls_port}"]')
                .replace('http = ["127.0.0.1:0"]', f'http = ["127.0.0.1:{self.http_port}"]'))

    def _tool(self, name: str) -> str:
        return require_tool(name) if self.debian else str(pebble_dir() / name)

    def start(self) -> None:
        """Start (or start again, on the same ports: a new root and an empty database)."""
        self.procs = []
        self._root = None
        log = open(self.root / "pebble.log", "ab")  # noqa: SIM115 - the processes own it
        self.procs.append(subprocess.Popen(
            [self._tool("pebble-challtestsrv"),
             "-dnsserver" if not self.debian else "-dns01", f"127.0.0.1:{self.dns_port}",
             *(() if self.debian else ("-doh", "")),
             "-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv6", "",
             "-management", f"127.0.0.1:{self.dns_management_port}"],
            stdout=log, stderr=subprocess.STDOUT,
        ))
        self.procs.append(subprocess.Popen(
            [self._tool("pebble"), "-config", str(self.root / "pebble.json"),
             "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
        ))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self._get(self.directory)
                self._dns("set-default-ipv4", {"ip": "127.0.0.1"})
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"pebble did not start:\n{(self.root / 'pebble.log').read_text()}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def set_renewal_info(self, cert_pem: bytes, answer: str) -> None:
        """Pebble's management API: what ``renewalInfo`` answers for this certificate (RFC 9773 §4.2)."""
        body = json.dumps({"Certificate": cert_pem.decode(), "ARIResponse": answer}).encode()
        request = urllib.request.Request(f"https://localhost:{self.management_port}/set-renewal-info/",
                                         data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5, context=self._client_ctx):
            pass

    def _get(self, url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=5, context=self._client_ctx) as response:
            return response.read()

    def _dns(self, verb: str, body: dict[str, object]) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{self.dns_management_port}/{verb}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def resolve(self, host: str, address: str) -> None:
        """Make ``host`` resolve to ``address`` (A record) for Pebble's validation."""
        self._dns("clear-a", {"host": host})
        self._dns("add-a", {"host": host, "addresses": [address]})

    def roots_pem(self) -> bytes:
        """The root Pebble issues under (a fresh one each run, fixed while it runs)."""
        if self._root is None:
            self._root = self._get(f"https://localhost:{self.management_port}/roots/0")
        return self._root
