"""Configuration: TOML -> frozen dataclasses, validated once.

Every error names the file and line of the offending key, and what to write
instead. Relative paths are resolved against the config file's directory.
Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge import names
from edge.acme.settings import AcmeConfig as AcmeConfig  # [acme] lives with the ACME code
from edge.acme.settings import CaEndpoint as CaEndpoint
from edge.acme.settings import parse_acme
from edge.limits import LimitsConfig as LimitsConfig  # [limits] lives with the limits
from edge.limits import parse_limits
from edge.toml_tables import ConfigError as ConfigError  # raised by every parser here, caught by callers
from edge.toml_tables import Source, Table, join
from edge.trust import TrustedProxies, trusted_key

DEFAULT_CONFIG = Path("config/edge.toml")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        # Only what cannot leave the machine without asking DNS: an IP literal
        # in 127.0.0.0/8 or ::1, or the name localhost (RFC 6761 §6.3). A name
        # such as "127.evil.example" resolves wherever its owner wants.
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class ServerConfig:
    https: tuple[Address, ...] = (Address("127.0.0.1", 8443),)
    http: tuple[Address, ...] = (Address("127.0.0.1", 8080),)
    admin: Address | None = Address("127.0.0.1", 9090)
    admin_token: str = ""
    admin_hosts: tuple[str, ...] = ()  # Host names allowed besides its address (DNS rebinding)
    metrics: Address | None = None  # /metrics and /healthz without a token, for scrapers and probes
    workers: int = 1
    proxy_protocol: bool = False  # every connection starts with a PROXY v1/v2 header (edge.tls.proxyproto)
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    # Not a configuration key: `edge serve --takeover` (an upgrade) takes over the
    # running edge's listening sockets (edge.takeover) instead of refusing its ports as taken.
    takeover: bool = False


@dataclass(frozen=True, slots=True)
class PlatformConfig:
    domain: str = "edge.localhost"
    cert: Path = Path("var/dev/platform.crt")
    key: Path = Path("var/dev/platform.key")
    strict_sni: bool = False
    # Create a development CA and wildcard certificate when cert/key are missing.
    dev_certificates: bool = True


@dataclass(frozen=True, slots=True)
class StoreConfig:
    backend: str = "file"
    path: Path = Path("var/store")
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    etcd_prefix: str = "/edge/"
    # The host's local copy of the index (LMDB; holds private keys): None is
    # ``index`` next to ``path`` (var/index beside var/store).
    index_path: Path | None = None

    @property
    def index_dir(self) -> Path:
        return self.index_path if self.index_path is not None else self.path.parent / "index"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    min_version: str = "TLSv1.2"
    context_cache_size: int = 10000
    default_cert: Path | None = None  # None: the platform certificate
    default_key: Path | None = None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    handshake_timeout: float = 10.0
    request_head_timeout: float = 30.0
    idle_timeout: float = 75.0
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    max_header_bytes: int = 64 * 1024
    max_uri_bytes: int = 8 * 1024
    # Idle keep-alive connections kept per backend. One HTTP/2 client connection
    # may have max_concurrent_streams (100) requests in flight to one backend:
    # with 64, a few busy h2 clients made edge close and reopen backend
    # connections for most requests (measured: 19k -> 35k h2 requests per
    # CPU-second at 320 streams in flight with 256 instead of 64).
    pool_size: int = 256
    # "always": any idle pooled connection serves any request; "safe" (HAProxy's
    # http-reuse safe): a client connection's first request gets a new one.
    http_reuse: str = "always"
    # HTTP/2 to clients (RFC 9113), offered by ALPN on the TLS listeners before
    # http/1.1; never h2c on the plain port. Backends stay HTTP/1.1.
    http2: bool = True
    max_concurrent_streams: int = 100  # per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    access_log: bool = False
    format: str = "text"  # "text" or "json" (one object per line)
    access_format: str = "json"  # access lines: "json" or "combined" (Apache/nginx combined log format)
    file: Path | None = None  # None: standard error; SIGUSR1 reopens it (logrotate)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics_per_app: bool = True  # [metrics] per_app: the edge_app_* series


# --- parsing helpers -------------------------------------------------------------


def parse_address(value: str) -> Address:
    """``host:port``, ``[v6]:port`` or ``:port`` (every interface)."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not match:
        raise ValueError(f"{value!r} is not host:port (e.g. \"127.0.0.1:8443\" or \"[::1]:8443\")")
    host = match.group(1) or match.group(3) or "0.0.0.0"
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return Address(host, port)


def _addresses(table: Table, key: str, default: tuple[Address, ...]) -> tuple[Address, ...]:
    raw = table.get(key, (list, str), None)
    if raw is None:
        return default
    raw = [raw] if isinstance(raw, str) else raw
    try:
        return tuple(parse_address(str(a)) for a in raw)
    except ValueError as exc:
        raise table.fail(key, str(exc)) from None


def _optional_address(table: Table, key: str, default: str) -> Address | None:
    raw = table.get(key, str, default)
    try:
        return parse_address(raw) if raw else None
    except ValueError as exc:
        raise table.fail(key, str(exc)) from None


def _host_names(table: Table, key: str) -> tuple[str, ...]:
    values = table.get(key, list, [])
    result = tuple(names.normalize(v) if isinstance(v, str) and "*" not in v else None for v in values)
    if None in result:
        raise table.fail(key, f"expected a list of host names (e.g. [\"edge-admin.internal\"]), got {values!r}")
    return result  # type: ignore[return-value]


def restart_needed(old: Config, new: Config) -> list[str]:
    """What changed in ``new`` that only a restart applies (listeners, store, ...)."""
    pairs = (
        ("[server] https", old.server.https, new.server.https),
        ("[server] http", old.server.http, new.server.http),
        ("[server] admin", old.server.admin, new.server.admin),
        ("[server] admin_hosts", old.server.admin_hosts, new.server.admin_hosts),
        ("[server] metrics", old.server.metrics, new.server.metrics),
        ("[server] workers", old.server.workers, new.server.workers),
        ("[store]", old.store, new.store),
        ("[platform] domain", old.platform.domain, new.platform.domain),
        ("[acme] enabled", old.acme.enabled, new.acme.enabled),
        ("[server] proxy_protocol", old.server.proxy_protocol, new.server.proxy_protocol),
        ("[server] trusted_proxies", old.server.trusted_proxies, new.server.trusted_proxies),
        ("[limits]", old.limits, new.limits),
        ("[proxy] http2", old.proxy.http2, new.proxy.http2),  # ALPN is set when contexts are built
    )
    return [what for what, before, after in pairs if before != after]


def live(old: Config, new: Config) -> Config:
    """The configuration a reload runs with: ``new``, but what needs a restart
    stays as it runs until then."""
    platform = dataclasses.replace(new.platform, domain=old.platform.domain)
    return dataclasses.replace(new, server=old.server, store=old.store, platform=platform, limits=old.limits)


def load(path: Path) -> Config:
    """Read and validate ``path``. Raises ConfigError naming the file and line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (pass --config FILE)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{match.group(1)}" if match else str(path)
        raise ConfigError(f"{where}: invalid TOML: {str(exc).split(' (at line')[0]}") from None
    src = Source(path, text)
    base = path.parent.resolve()
    known = {"server", "platform", "store", "acme", "tls", "proxy", "log", "limits", "metrics"}
    for name, value in data.items():
        if name not in known:
            raise src.error(name, None, f"unknown section; expected one of {', '.join(sorted(known))}")
        if not isinstance(value, dict):
            raise src.error(name, None, "must be a table")

    def table(name: str) -> Table:
        return Table(src, name, data.get(name, {}))

    server = _read(table("server"), _server)
    if server.proxy_protocol and not server.trusted_proxies:
        raise src.error("server", "trusted_proxies", "proxy_protocol = true needs the addresses allowed to send "
                        'PROXY headers (e.g. trusted_proxies = ["10.0.0.0/8"])')
    platform = _read(table("platform"), lambda t: _platform(t, base))
    store = _read(table("store"), lambda t: _store(t, base))
    acme = _read(table("acme"), lambda t: parse_acme(t, base, server.http, server.https))
    tls = _read(table("tls"), lambda t: _tls(t, base))
    proxy = _read(table("proxy"), _proxy)
    log = _read(table("log"), lambda t: _log(t, base))
    limits = _read(table("limits"), parse_limits)
    per_app = _read(table("metrics"), lambda t: bool(t.get("per_app", bool, True)))
    if server.admin and not server.admin.is_loopback and not server.admin_token:
        raise src.error(
            "server", "admin", "the admin API is bound beyond loopback; set admin_token (or EDGE_ADMIN_TOKEN) too"
        )
    return Config(path, server, platform, store, acme, tls, proxy, log, limits, per_app)


# --- one parser per section: each reads its table and returns its settings ---------
T = TypeVar("T")


def _read(table: Table, parser: Callable[[Table], T]) -> T:
    """Parse one table, then refuse keys the parser did not read (typos)."""
    value = parser(table)
    table.done()
    return value


def _server(t: Table) -> ServerConfig:
    d = ServerConfig()
    workers_raw = t.get("workers", (int, str), 1)
    if workers_raw == "auto":
        workers = len(os.sched_getaffinity(0)) or 1
    elif isinstance(workers_raw, int) and workers_raw >= 1:
        workers = workers_raw
    else:
        raise t.fail("workers", f"expected a number >= 1 or \"auto\", got {workers_raw!r}")
    return ServerConfig(
        https=_addresses(t, "https", d.https),
        http=_addresses(t, "http", d.http),
        admin=_optional_address(t, "admin", str(d.admin)),
        admin_token=t.get("admin_token", str, "") or os.environ.get("EDGE_ADMIN_TOKEN", ""),
        admin_hosts=_host_names(t, "admin_hosts"),
        metrics=_optional_address(t, "metrics", ""),
        workers=workers,
        proxy_protocol=t.get("proxy_protocol", bool, False),
        trusted_proxies=trusted_key(t),
    )


def _platform(t: Table, base: Path) -> PlatformConfig:
    dp = PlatformConfig()
    raw_domain = t.get("domain", str, dp.domain)
    domain = names.normalize(raw_domain)
    if domain is None:
        raise t.fail("domain", f"{raw_domain!r} is not a valid host name (e.g. \"apps.example.net\")")
    return PlatformConfig(
        domain=domain,
        cert=t.path("cert", dp.cert, base) or join(base, dp.cert),
        key=t.path("key", dp.key, base) or join(base, dp.key),
        strict_sni=t.get("strict_sni", bool, False),
        dev_certificates=t.get("dev_certificates", bool, True),
    )


def _store(t: Table, base: Path) -> StoreConfig:
    ds = StoreConfig()
    backend = t.get("backend", str, ds.backend)
    if backend not in ("file", "etcd"):
        raise t.fail("backend", f"expected \"file\" or \"etcd\", got {backend!r}")
    etcd = Table(t.src, "store.etcd", t.get("etcd", dict, {}))
    store = StoreConfig(
        backend=backend,
        path=t.path("path", ds.path, base) or join(base, ds.path),
        etcd_endpoints=tuple(str(e) for e in etcd.get("endpoints", list, list(ds.etcd_endpoints))),
        etcd_prefix=etcd.get("prefix", str, ds.etcd_prefix),
        index_path=t.path("index_path", None, base),
    )
    etcd.done()
    return store


def _tls(t: Table, base: Path) -> TlsConfig:
    min_version = t.get("min_version", str, "TLSv1.2")
    if min_version not in ("TLSv1.2", "TLSv1.3"):
        raise t.fail(
            "min_version", f"expected \"TLSv1.2\" or \"TLSv1.3\" (older versions are unsafe), got {min_version!r}"
        )
    cache_size = t.get("context_cache_size", int, 10000)
    if cache_size < 1:
        raise t.fail("context_cache_size", "must be at least 1")
    default_cert = t.path("default_cert", None, base)
    default_key = t.path("default_key", None, base)
    if (default_cert is None) != (default_key is None):
        raise t.fail("default_cert" if default_cert is None else "default_key",
                     "set both default_cert and default_key, or neither")
    return TlsConfig(min_version, cache_size, default_cert, default_key)


def _proxy(t: Table) -> ProxyConfig:
    dx = ProxyConfig()
    values: dict[str, Any] = {}
    for key in ("handshake_timeout", "request_head_timeout", "idle_timeout", "connect_timeout", "response_timeout"):
        value = t.get(key, float, getattr(dx, key))
        if value <= 0:
            raise t.fail(key, "must be a positive number of seconds")
        values[key] = value
    for key in ("max_header_bytes", "max_uri_bytes", "pool_size", "max_concurrent_streams"):
        value = t.get(key, int, getattr(dx, key))
        if value < 1:
            raise t.fail(key, "must be a positive number")
        values[key] = value
    values["http_reuse"] = t.get("http_reuse", str, dx.http_reuse)
    if values["http_reuse"] not in ("always", "safe"):
        raise t.fail("http_reuse", f'expected "always" or "safe", got {values["http_reuse"]!r}')
    values["http2"] = t.get("http2", bool, dx.http2)
    return ProxyConfig(**values)


def _log(t: Table, base: Path) -> LogConfig:
    level = t.get("level", str, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise t.fail("level", f"expected debug, info, warning or error, got {level!r}")
    log_format = t.get("format", str, "text")
    if log_format not in ("text", "json"):
        raise t.fail("format", f'expected "text" or "json", got {log_format!r}')
    access_format = t.get("access_format", str, "json")
    if access_format not in ("json", "combined"):
        raise t.fail("access_format", f'expected "json" or "combined", got {access_format!r}')
    return LogConfig(level=level, access_log=t.get("access_log", bool, False), format=log_format,
                     access_format=access_format, file=t.path("file", None, base))
