"""What the management commands do to the store, for the CLI and the admin API.

Each operation validates everything first and writes only when all of it is
right, so a refused command changes nothing. Errors are ``OperationError``
with a one-line message saying what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from edge import names, records
from edge.appops import AppSettingsOps, merged_record
from edge.appsettings import Hsts
from edge.config import Config, parse_address
from edge.records import KEY_TYPES, SOURCES, CertMeta, CertSource, EntryError, parse_cert, parse_domain
from edge.store import base
from edge.store.base import Store
from edge.store.index import Index
from edge.tls import bundle as bundles
from edge.tls.selector import Selector

APP_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
EXPIRY_SOON = 14 * 86400  # SPEC §2: within 14 days of expiry, acme keeps a standby


def _stamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def acme_summary(state: dict | None) -> str | None:
    """One cell of `edge domains`: pending, valid until ..., failed ...; next attempt ..."""
    if state is None:
        return None
    kind = state.get("state", "?")
    if kind == "valid":
        return f"valid until {state.get('valid_until', '?')}{_acme_plan(state)}"
    if kind == "failed":
        return (f"failed x{state.get('failures', 1)}: {state.get('last_error', '?')}; "
                f"next attempt {state.get('next_attempt', '?')}")
    if kind == "pending" and state.get("last_error"):
        return f"pending (last error: {state['last_error']})"
    return str(kind) if kind != "wildcard" else "no ACME for wildcards: upload a certificate"


_REASONS = {"ari": "the CA's ARI window", "lifetime": "2/3 of its lifetime", "retry": "retry"}


def _acme_plan(state: dict) -> str:
    """"; renewal <when> (<why>); from <CA directory>" for an ACME state (RFC 9773)."""
    out = ""
    if state.get("next_renewal"):
        why = _REASONS.get(str(state.get("renewal_reason")), str(state.get("renewal_reason")))
        out += f"; renewal {state['next_renewal']} ({why})"
    plans = state.get("plans") if isinstance(state.get("plans"), dict) else {}
    issuers = sorted({str(p.get("issuer")) for p in plans.values() if isinstance(p, dict) and p.get("issuer")})
    return out + (f"; from {', '.join(issuers)}" if issuers else "")


def _soon(chosen: tuple, serving: str) -> float:
    """"expiring" within: 14 days (SPEC §2), or for acme a sixth of the lifetime when
    shorter: a 6-day certificate (RFC 9773 renewal at about day 3) is expiring in its
    last day, when its renewal is late, not all its life."""
    if serving != CertSource.ACME:
        return EXPIRY_SOON
    return min([EXPIRY_SOON, *((b.not_after - b.not_before) / 6 for b in chosen)])


def _day(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def _owner(value: bytes) -> str:
    """The app a stored domain entry names; a damaged entry names none a command could match."""
    try:
        return parse_domain(value)
    except EntryError as exc:
        raise OperationError(f"a stored domain entry is damaged ({exc}); `edge check` lists it") from None


class OperationError(ValueError):
    """A refused management command; nothing was changed."""


class NotFoundError(OperationError):
    """The app or domain named does not exist."""


@dataclass(frozen=True)
class Upload:
    """A certificate upload: the PEM bytes and the names to quote in messages."""

    cert_pem: bytes
    key_pem: bytes
    cert_label: str = "certificate"
    key_label: str = "key"

    @classmethod
    def from_files(cls, cert_path: str, key_path: str) -> Upload:
        try:
            with open(cert_path, "rb") as f:
                cert_pem = f.read(bundles.MAX_BUNDLE_BYTES + 1)
            with open(key_path, "rb") as f:
                key_pem = f.read(bundles.MAX_BUNDLE_BYTES + 1)
        except OSError as exc:
            raise OperationError(f"{exc.filename}: {exc.strerror}") from None
        return cls(cert_pem, key_pem, cert_path, key_path)


@dataclass(frozen=True)
class Result:
    message: str
    warnings: tuple[str, ...] = ()


class Operations(AppSettingsOps):
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.platform_domain = config.platform.domain
        port = config.server.https[0].port if config.server.https else 443
        # The app's URL is printed to be pasted: off 443 (the shipped config listens on
        # 8443) the port belongs in it; port 0 (chosen at bind) is not known here.
        self.https_suffix = "" if port in (443, 0) else f":{port}"

    # --- reading ---------------------------------------------------------------------
    async def load_index(self) -> Index:
        index = Index()
        async for key, value in self.store.snapshot():
            index.apply_put(key, value)
        return index

    # --- apps ---------------------------------------------------------------------------
    async def apps_add(self, name: str, backends: list[str], force_https: bool = True, *,
                       hsts: Hsts | bool | None = None, maintenance: bool | None = None) -> Result:
        """Add or update an app; ``hsts``/``maintenance`` None keep what the app had (``appops``)."""
        if not APP_NAME.match(name):
            raise OperationError(
                f"app name {name!r} is invalid: use 1-63 lower-case letters, digits and hyphens, "
                "starting with a letter or digit"
            )
        if not backends:
            raise OperationError("give at least one --backend HOST:PORT")
        clean = []
        for raw in backends:
            try:
                address = parse_address(raw)
            except ValueError as exc:
                raise OperationError(f"backend {exc}") from None
            if address.port == 0:
                raise OperationError(f"backend {raw!r} has port 0; give the port the app listens on")
            clean.append(str(address))
        async with self.store.write_lock():
            old = await self.store.get(base.app_key(name))
            record = merged_record(old, {"backends": clean, "force_https": force_https}, hsts, maintenance)
            await self.store.put(base.app_key(name), records.encode_app(clean, force_https, record))
        verb = "updated" if old is not None else "added"
        note = " (in maintenance: answering 503)" if record.get("maintenance") else ""
        url = f"https://{name}.{self.platform_domain}{self.https_suffix}"
        return Result(f"app {name} {verb}: {url} -> {', '.join(clean)}{note}",
                      tuple(hsts.warnings()) if isinstance(hsts, Hsts) else ())

    async def apps_remove(self, name: str) -> Result:
        async with self.store.write_lock():
            if await self.store.get(base.app_key(name)) is None:
                raise NotFoundError(f"no app named {name!r}; `edge apps` lists them")
            attached = sorted(
                domain for key, value in (await self.store.items(base.DOMAINS)).items()
                if _owner(value) == name and (domain := key[len(base.DOMAINS):])
            )
            if attached:
                raise OperationError(
                    f"app {name} still has domains ({', '.join(attached)}); "
                    "remove them first with `edge domains-remove DOMAIN`"
                )
            await self.store.delete(base.app_key(name))
        return Result(f"app {name} removed")

    async def apps(self) -> list[dict]:
        index = await self.load_index()
        return [
            {
                "app": app.name,
                "backends": list(app.backends),
                "force_https": app.force_https,
                "hsts": app.hsts.decode() or None,
                "maintenance": app.maintenance,
                "error_pages": [status for status, _ in app.error_pages],
                "domains": sorted(d for d, a in index.domains.items() if a == app.name),
            }
            for app in sorted(index.apps.values(), key=lambda a: a.name)
        ]

    # --- domains ---------------------------------------------------------------------------
    def domain_name(self, raw: str) -> str:
        """The canonical domain of ``raw``, refused when invalid or under the platform domain."""
        domain = names.normalize_pattern(raw)
        if domain is None:
            raise OperationError(f"{raw!r} is not a valid domain name (e.g. www.example.com or *.example.com)")
        problem = names.public_suffix_problem(domain)
        if problem is not None:
            raise OperationError(problem)
        bare = domain[2:] if names.is_wildcard(domain) else domain
        if names.is_under(bare, self.platform_domain):
            raise OperationError(
                f"{domain} is under the platform domain {self.platform_domain}, which every app "
                "already has; add a domain of your own"
            )
        return domain

    @staticmethod
    def _validated_bundle(domain: str, upload: Upload) -> bundles.Bundle:
        try:
            return bundles.validate(
                upload.cert_pem, upload.key_pem, domain, cert_path=upload.cert_label, key_path=upload.key_label
            )
        except bundles.BundleError as exc:
            raise OperationError(str(exc)) from None

    async def _write_bundle(self, domain: str, source: str, validated: bundles.Bundle) -> None:
        key = base.cert_key(domain, source, validated.key_type)
        meta = CertMeta(domain, source, validated.key_type, validated.not_before,
                        validated.not_after, validated.fingerprint)
        await self.store.put(key, records.encode_bundle(meta, validated.pem), secret=True)

    async def _drop_custom(self, domain: str) -> None:
        for key_type in KEY_TYPES:
            await self.store.delete(base.cert_key(domain, CertSource.CUSTOM, key_type))

    async def domains_add(self, raw: str, app: str, upload: Upload | None = None) -> Result:
        domain = self.domain_name(raw)
        if upload is None and self.config.acme.enabled and names.is_wildcard(domain):
            raise OperationError(
                f"{domain} is a wildcard domain: Let's Encrypt issues wildcard certificates only through "
                "DNS-01 validation, which edge does not do (HTTP-01 and TLS-ALPN-01 cannot prove a wildcard, "
                f"RFC 8555 §7.1.3); upload a certificate with `edge domains-add {domain} --app {app} "
                "--cert FILE --key FILE`"
            )
        validated = self._validated_bundle(domain, upload) if upload is not None else None
        warnings: list[str] = list(validated.warnings) if validated else []
        async with self.store.write_lock():
            if await self.store.get(base.app_key(app)) is None:
                raise NotFoundError(
                    f"no app named {app!r}; add it first with `edge apps-add {app} --backend HOST:PORT`"
                )
            current = await self.store.get(base.domain_key(domain))
            if current is not None:
                owner = _owner(current)
                if owner != app:
                    raise OperationError(f"{domain} is already attached to app {owner}; a domain serves one app")
                if validated is None:
                    raise OperationError(
                        f"{domain} is already attached to {app}; use `edge domains-ssl` to set its certificate"
                    )
            # The certificate first, then the domain: the ACME manager must never
            # see the domain without it (it would order one). A command killed in
            # between leaves a certificate of no domain: never served (the
            # selector serves attached domains only), named by `edge check`.
            if validated is not None:
                await self._write_bundle(domain, CertSource.CUSTOM, validated)
            if current is None:
                await self.store.put(base.domain_key(domain), records.encode_domain(app))
        if validated is None and not self.config.acme.enabled:
            warnings.append(
                f"{domain} has no certificate: handshakes for it get the default certificate until you "
                f"upload one with `edge domains-ssl {domain} --cert FILE --key FILE`"
            )
        what = f" with a custom {validated.key_type.upper()} certificate" if validated else ""
        return Result(f"domain {domain} added to app {app}{what}", tuple(warnings))

    async def domains_ssl(self, raw: str, upload: Upload | None, disable: bool = False) -> Result:
        domain = self.domain_name(raw)
        if upload is None and not disable:
            raise OperationError("give --cert FILE and --key FILE, or --disable")
        validated = self._validated_bundle(domain, upload) if upload is not None and not disable else None
        async with self.store.write_lock():
            if await self.store.get(base.domain_key(domain)) is None:
                raise NotFoundError(f"no domain {domain}; add it with `edge domains-add {domain} --app APP`")
            if validated is None:
                await self._drop_custom(domain)
                return Result(
                    f"custom certificate of {domain} removed; an acme certificate takes over where one is held"
                )
            # An upload replaces the bundle of its key type and keeps the other, as
            # nginx serves one ssl_certificate per key type: RSA + ECDSA side by side.
            await self._write_bundle(domain, CertSource.CUSTOM, validated)
            others = {key_type: await self.store.get(base.cert_key(domain, CertSource.CUSTOM, key_type))
                      for key_type in KEY_TYPES if key_type != validated.key_type}
        message = (
            f"custom {validated.key_type.upper()} certificate of {domain} in service "
            f"(expires {_day(validated.not_after)})"
        )
        for key_type, other in others.items():
            if other is not None:
                try:
                    meta = parse_cert(base.cert_key(domain, CertSource.CUSTOM, key_type), other)
                except EntryError:
                    continue  # a damaged entry: `edge check` names it
                message += (
                    f"; also serving the {key_type.upper()} certificate (expires {_day(meta.not_after)}) "
                    f"to clients that prefer it; `edge domains-ssl {domain} --disable` drops both"
                )
        return Result(message, validated.warnings)

    async def domains_remove(self, raw: str) -> Result:
        domain = self.domain_name(raw)
        async with self.store.write_lock():
            if await self.store.get(base.domain_key(domain)) is None:
                raise NotFoundError(f"no domain {domain}; `edge domains` lists them")
            # The domain first: from then on nothing serves or renews its
            # certificates (the ACME manager would order a replacement for a
            # deleted one of a live domain). A command killed before the
            # certificates are gone leaves them unserved; `edge check` names them.
            await self.store.delete(base.domain_key(domain))
            for source in SOURCES:
                for key_type in KEY_TYPES:
                    await self.store.delete(base.cert_key(domain, source, key_type))
            await self.store.delete(base.ACME_STATUS + domain)
        return Result(f"domain {domain} removed")

    def _acme_state(self, domain: str, stored: bytes | None) -> dict | None:
        """What the ACME manager last did for ``domain`` (``acme/status/<domain>``)."""
        if stored is None:
            if self.config.acme.enabled and names.is_wildcard(domain):
                return {"state": "wildcard", "last_error": "wildcards need an uploaded certificate"}
            return None
        try:
            state = json.loads(stored)
        except ValueError:
            return {"state": "unreadable"}
        for stamp in ("next_attempt", "valid_until", "updated", "next_renewal"):
            if isinstance(state.get(stamp), (int, float)):
                state[stamp] = _stamp(state[stamp])
        return state

    async def domains(self, app: str | None = None, now: float | None = None) -> list[dict]:
        index = await self.load_index()
        selector = Selector(index, self.platform_domain, strict_sni=False)
        when = time.time() if now is None else now
        acme_states = {key[len(base.ACME_STATUS):]: value for key, value in
                       (await self.store.items(base.ACME_STATUS)).items()}
        rows = []
        for domain, owner in sorted(index.domains.items()):
            if app is not None and owner != app:
                continue
            lookup = "x" + domain[1:] if names.is_wildcard(domain) else domain
            choice = selector.select(lookup, when)
            held = index.certs.get(domain)
            serving = choice.source.value if choice is not None else "none"
            chosen = choice.bundles if choice is not None else ()
            expiry = min((b.not_after for b in chosen), default=None)
            if chosen:
                status = "expiring" if expiry is not None and expiry - when < _soon(chosen, serving) else "ok"
            elif held is not None:
                status = "expired"
            else:
                status = "no certificate"
            rows.append(
                {
                    "domain": domain,
                    "app": owner,
                    "serving": serving,
                    "key_types": sorted(b.key_type for b in chosen),
                    "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry)) if expiry else None,
                    "status": status,
                    "errors": sorted(v for k, v in index.errors.items() if k.endswith("/" + domain)),
                    "acme": self._acme_state(domain, acme_states.get(domain)),
                }
            )
        return rows
