"""``[acme]``: its settings and their parsing (RFC 8555 directory, RFC 9773 ARI
bounds, profiles, fallback CAs). Kept apart from ``edge.config`` so that the
ACME settings live with the ACME code; ``edge.config`` re-exports them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.records import KEY_TYPES, KeyType
from edge.toml_tables import Table, join


@dataclass(frozen=True, slots=True)
class CaEndpoint:
    """One ACME server: its directory URL, the CA to trust for its HTTPS, the profile to ask for."""

    directory: str
    ca_bundle: Path | None = None
    # A name from its meta.profiles; "": its default. None (a fallback that names none):
    # the primary's profile when this CA offers it, else its default.
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    enabled: bool = False
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""
    ca_bundle: Path | None = None
    key_types: tuple[str, ...] = (KeyType.ECDSA,)  # and/or KeyType.RSA
    challenges: tuple[str, ...] = ("http-01", "tls-alpn-01")  # in order of preference
    backoff_min: float = 60.0  # seconds after a first failure; doubles with each failure
    backoff_max: float = 86400.0
    orders_per_hour: int = 100  # per node; Let's Encrypt allows 300 new orders per 3 hours
    profile: str = ""  # a name from the directory's meta.profiles; "": the CA's default
    fallback_directories: tuple[CaEndpoint, ...] = ()  # asked in order when the primary cannot issue
    ari_min: float = 3600.0  # RFC 9773 Retry-After of renewalInfo is kept within these (seconds)
    ari_max: float = 86400.0

    @property
    def cas(self) -> tuple[CaEndpoint, ...]:
        """The primary first, then the fallbacks."""
        return (CaEndpoint(self.directory, self.ca_bundle, self.profile), *self.fallback_directories)


def _choices(t: Table, key: str, allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    values = t.get(key, list, list(default))
    if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
        raise t.fail(key, f"expected a list of distinct values among {', '.join(map(repr, allowed))}, got {values!r}")
    return tuple(values)


def parse_acme(t: Table, base: Path, http: tuple[Any, ...], https: tuple[Any, ...]) -> AcmeConfig:
    """The ``[acme]`` table , checked; errors name the line."""
    da = AcmeConfig()
    acme = AcmeConfig(
        enabled=t.get("enabled", bool, da.enabled),
        directory=t.get("directory", str, da.directory),
        email=t.get("email", str, da.email),
        ca_bundle=t.path("ca_bundle", None, base),
        key_types=_choices(t, "key_types", tuple(k.value for k in KEY_TYPES), da.key_types),
        challenges=_choices(t, "challenges", ("http-01", "tls-alpn-01"), da.challenges),
        backoff_min=t.get("backoff_min", float, da.backoff_min),
        backoff_max=t.get("backoff_max", float, da.backoff_max),
        orders_per_hour=t.get("orders_per_hour", int, da.orders_per_hour),
        profile=t.get("profile", str, da.profile),
        fallback_directories=_fallbacks(t, base),
        ari_min=t.get("ari_min", float, da.ari_min),
        ari_max=t.get("ari_max", float, da.ari_max),
    )
    if not 0 < acme.ari_min <= acme.ari_max:
        raise t.fail("ari_min", "expected 0 < ari_min <= ari_max (seconds between renewalInfo checks)")
    if acme.enabled and not acme.directory.startswith("https://"):
        raise t.fail("directory", f"expected the https:// URL of an ACME directory, got {acme.directory!r}")
    if not 0 < acme.backoff_min <= acme.backoff_max:
        raise t.fail("backoff_min", "expected 0 < backoff_min <= backoff_max (seconds)")
    if acme.orders_per_hour < 1:
        raise t.fail("orders_per_hour", f"expected a positive number, got {acme.orders_per_hour}")
    for key, ca in (("ca_bundle", acme.ca_bundle), *(("fallback_directories", f.ca_bundle)
                                                       for f in acme.fallback_directories)):
        if acme.enabled and ca is not None and not ca.is_file():
            raise t.fail(key, f"{ca} is not a file (a PEM CA certificate for the ACME server)")
    if acme.enabled and "http-01" in acme.challenges and not http:
        raise t.fail("challenges", "http-01 is answered on the [server] http listeners, and there are none: "
                     'add one (port 80 in production) or set challenges = ["tls-alpn-01"]')
    if acme.enabled and "tls-alpn-01" in acme.challenges and not https:
        raise t.fail("challenges", "tls-alpn-01 is answered on the [server] https listeners, and there are none")
    return acme


def _fallbacks(t: Table, base: Path) -> tuple[CaEndpoint, ...]:
    """``[acme] fallback_directories``: URLs, or tables ``{directory = "...", ca_bundle = "...",
    profile = "..."}``."""
    out = []
    for entry in t.get("fallback_directories", list, []):
        if isinstance(entry, str):
            entry = {"directory": entry}
        if not isinstance(entry, dict) or set(entry) - {"directory", "ca_bundle", "profile"} \
                or not isinstance(entry.get("directory"), str) \
                or not all(isinstance(entry.get(k, ""), str) for k in ("ca_bundle", "profile")):
            raise t.fail("fallback_directories", f"expected a directory URL or a table {{directory = \"https://...\", "
                         f"ca_bundle = \"FILE\", profile = \"NAME\"}} (the last two optional), got {entry!r}")
        if not entry["directory"].startswith("https://"):
            raise t.fail("fallback_directories", f"expected the https:// URL of an ACME directory, "
                         f"got {entry['directory']!r}")
        bundle = entry.get("ca_bundle", "")
        out.append(CaEndpoint(entry["directory"], join(base, Path(bundle)) if bundle else None, entry.get("profile")))
    if len({e.directory for e in out} | {t.data.get("directory")}) != len(out) + 1:
        raise t.fail("fallback_directories", "each directory may appear once (and not be the primary)")
    return tuple(out)
