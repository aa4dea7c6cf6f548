"""One domain's turn under its lock: renewal information, orders, and the CA to order from.

A per-domain lock in the store lets one node of a fleet act for a domain; the certificate is written
only while that lock is still held. Under the lock the shared state (``acme/status/<domain>``) and the
stored certificates are read again, since another node may have just acted:

1. each acme certificate whose renewal information is due is asked its CA's ``renewalInfo``
   (RFC 9773 §4.1); the answer becomes the certificate's plan (``edge.acme.renewal``). A CA
   that cannot be reached or answers badly is logged, the lifetime rule stands, and it is
   asked again after ``ari_min``.
2. what is due is ordered from the primary CA, with ``replaces`` naming the certificate
   it renews when that CA issued it (RFC 9773 §5) and the configured ``profile``. When the
   primary cannot be reached, rate-limits, or its back-off would leave the domain without
   a valid certificate, the next of ``fallback_directories`` is asked (each CA has its own
   account key in the store). Every order starts again at the primary.
3. after a failure a domain waits ``backoff_min * 2**(failures-1)`` s (capped at ``backoff_max``, at least Retry-After).

Orders run in a thread (``edge.acme.client`` blocks); store writes on the loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from edge import records
from edge.acme import renewal
from edge.acme.accounts import Accounts
from edge.acme.client import AcmeClient, AcmeError, Issued, cert_id, new_account_key
from edge.acme.renewal import DomainStatus, Plan
from edge.acme.settings import AcmeConfig, CaEndpoint
from edge.records import KEY_TYPES, SOURCES, CertMeta, CertSource, DomainCerts, EntryError, parse_cert
from edge.store import base
from edge.tls import bundle as bundles

log = logging.getLogger(__name__)

LOCK_TTL = 60  # seconds; refreshed every LOCK_TTL / 3 while an order runs
CHALLENGE_TTL = 600  # seconds a published challenge answer lives in the store
BUSY_RETRY = 30.0  # another node holds the domain's lock: look again after this
ARI_CLIENT_TTL = 3600.0  # seconds a client (its connection, its directory) serves renewal-information checks


def status_key(domain: str) -> str:
    return base.ACME_STATUS + domain


@dataclass
class AcmeStats:
    """Orders by result, for ``edge_acme_orders_total`` (SPEC §8)."""

    orders: dict[str, int] = field(default_factory=lambda: {"valid": 0, "failed": 0, "rate_limited": 0,
                                                             "unreachable": 0})

    def count(self, result: str) -> None:
        self.orders[result] = self.orders.get(result, 0) + 1


@dataclass
class Held:
    """What the store holds for a domain, read under its lock."""

    certs: DomainCerts
    pems: dict[str, bytes]  # acme key type -> the bundle's PEM (leaf first)
    issuers: dict[str, str]  # acme key type -> the directory URL in its header


class Orders:
    def __init__(self, config: AcmeConfig, store: base.Store, status: dict[str, DomainStatus],
                 domains: Any, pool: ThreadPoolExecutor, orders_cap: collections.deque[float]) -> None:
        self.config = config
        self.store = store
        self.status = status  # shared with the manager
        self.domains = domains  # the index's domain -> app mapping (is the domain still there?)
        self.stats = AcmeStats()
        self._pool = pool
        self._recent_orders = orders_cap
        self._accounts = Accounts(store, pool)
        self._ari_clients: dict[tuple[str, int], tuple[float, AcmeClient]] = {}

    # --- one domain's turn ------------------------------------------------------------------
    async def turn(self, domain: str) -> float:
        """Act for ``domain`` under its lock; returns when to look at it again (0: at once)."""
        lock = await self.store.try_lock(f"acme/{domain}", LOCK_TTL)
        if lock is None:
            log.info("ACME: another node is ordering for %s; looking again in %.0f s", domain, BUSY_RETRY)
            return time.time() + BUSY_RETRY
        refresher = asyncio.get_running_loop().create_task(self._keep(lock))
        try:
            # Another node may have just acted for this domain and let the lock go:
            # decide again from the store, which its writes reached first.
            shared = await self.store.get(status_key(domain))
            stored = DomainStatus.from_bytes(shared) if shared is not None else None
            if stored is not None:
                self.status[domain] = stored
            if stored is not None and stored.next_attempt is not None and stored.next_attempt > time.time():
                return stored.next_attempt  # backing off
            held = await self._held(domain)
            key_types = self.config.key_types
            checks = renewal.ari_checks(held.certs, key_types, time.time(), stored)
            if checks:
                await self._check_ari(domain, held, checks)
            due, later = renewal.needs(held.certs, key_types, time.time(), self.status.get(domain))
            if not due:
                return later or 0.0
            await self._within_rate_limit()
            for key_type in due:
                if not await self._order_one(domain, key_type, lock, held):
                    break
            return 0.0
        finally:
            refresher.cancel()
            await lock.release()

    async def _held(self, domain: str) -> Held:
        certs = DomainCerts()
        pems: dict[str, bytes] = {}
        issuers: dict[str, str] = {}
        for source in SOURCES:
            for key_type in KEY_TYPES:
                key = base.cert_key(domain, source, key_type)
                value = await self.store.get(key)
                if value is None:
                    continue
                try:
                    certs = certs.replaced(parse_cert(key, value))
                except EntryError:
                    continue  # a broken entry is no certificate
                if source == CertSource.ACME:
                    header, _, pems[key_type] = value.partition(b"\n")
                    try:
                        issuers[key_type] = str(json.loads(header).get("issuer") or self.config.directory)
                    except (ValueError, AttributeError):
                        issuers[key_type] = self.config.directory
        return Held(certs, pems, issuers)

    # --- renewal information (RFC 9773) -------------------------------------------------------
    def _ca(self, directory: str) -> CaEndpoint | None:
        return next((ca for ca in self.config.cas if ca.directory == directory), None)

    async def _check_ari(self, domain: str, held: Held, key_types: list[str]) -> None:
        status = self.status.get(domain) or DomainStatus("valid", updated=time.time())
        plans = dict(status.plans or {})
        for key_type in key_types:
            meta = next(m for m in held.certs.of(CertSource.ACME) if m.key_type == key_type)
            issuer = held.issuers.get(key_type, self.config.directory)
            ca = self._ca(issuer)
            try:
                # renewalInfo is an unauthenticated GET (RFC 9773 §4.1): a CA no longer
                # configured is still asked, with a throwaway key and no account made there.
                account = await self._account(ca) if ca is not None else new_account_key()
            except AcmeError as exc:
                log.warning("ACME: no account key for %s: %s", issuer, exc)
                continue
            ca = ca or CaEndpoint(issuer)
            plan = await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda ca=ca, account=account, key_type=key_type, meta=meta: self._plan_blocking(
                    self._ari_client(ca, account), domain, held.pems[key_type], meta, status.plan(key_type)))
            plans[key_type] = asdict(plan)
        status.plans = plans
        await self._set_status(domain, status)

    def _ari_client(self, ca: CaEndpoint, account: bytes) -> AcmeClient:
        """A client per CA kept for renewal-information checks (one connection and one
        directory read, not one per check: at a million domains that is ~50 checks a
        second); made again every ``ARI_CLIENT_TTL`` so a changed directory is seen."""
        now = time.time()
        key = (ca.directory, threading.get_ident())  # called in the pool's thread: one client per thread
        made, client = self._ari_clients.get(key, (0.0, None))
        if client is None or now - made > ARI_CLIENT_TTL:
            client = AcmeClient(ca.directory, account, self.config.email, ca.ca_bundle)
            self._ari_clients[key] = (now, client)
        return client

    def _plan_blocking(self, client: AcmeClient, domain: str, pem: bytes, meta: CertMeta,
                       previous: Plan | None) -> Plan:
        """In a thread: ask the CA when to renew this certificate (RFC 9773 §4.2, §4.3)."""
        now = time.time()
        try:
            ident = cert_id(pem)
        except ValueError:
            ident = ""
        lifetime = Plan(meta.fingerprint, client.directory_url, renewal.renew_at(meta), "lifetime", now, ident)
        cfg = self.config
        try:
            window, retry = client.renewal_info(pem) if ident else (None, None)
        except (AcmeError, ValueError) as exc:
            unreachable = isinstance(exc, AcmeError) and exc.kind == "unreachable"
            plan = renewal.plan_after_error(lifetime, previous, unreachable, now, cfg.ari_min, cfg.ari_max,
                                            exc.retry_after if isinstance(exc, AcmeError) else None)
            # RFC 9773 §4.3.3: logged, never fatal; a CA that is down keeps its last window for it.
            log.warning("ACME: renewal information for %s from %s unusable (%s); %s, asking again in %.0f s "
                        "(error %d in a row)", domain, client.directory_url, exc,
                        "keeping the CA's last window" if plan.reason == "ari" else "renewing by the lifetime rule",
                        plan.ari_next - now, plan.ari_failures)
            return plan
        if window is None:  # the CA has no renewalInfo: ask again once a day, it may come
            lifetime.ari_next = now + cfg.ari_max
            return lifetime
        start, end = window
        keep = (previous is not None and previous.fingerprint == meta.fingerprint and previous.reason == "ari"
                and start <= previous.renew_at <= end)
        when = previous.renew_at if keep and previous else renewal.pick_in_window(start, end)
        check = now + renewal.next_check(retry, cfg.ari_min, cfg.ari_max)
        # Said once per window (at 1M domains a check every few hours is a lot of lines).
        log.log(logging.DEBUG if keep else logging.INFO,
                "ACME: %s %s certificate: the CA suggests renewing between %s and %s; planned %s",
                domain, meta.key_type.upper(), _stamp(start), _stamp(end), _stamp(when))
        return Plan(meta.fingerprint, client.directory_url, when, "ari", check, ident)

    # --- orders ---------------------------------------------------------------------------------
    async def _order_one(self, domain: str, key_type: str, lock: base.Lock, held: Held) -> bool:
        previous = self.status.get(domain)
        failures = previous.failures if previous else 0
        await self._set_status(domain, DomainStatus(
            "pending", failures=failures, last_error=previous.last_error if previous else None,
            updated=time.time(), plans=previous.plans if previous else None))
        now = time.time()
        current = next((m for m in held.certs.of(CertSource.ACME)
                        if m.key_type == key_type and m.not_after > now), None)
        plan = previous.plan(key_type) if previous else None
        valid_until = max((m.not_after for m in held.certs if m.key_type == key_type and m.not_after > now),
                          default=None)
        cas = self.config.cas
        for number, ca in enumerate(cas):
            replaces = ""
            if current is not None and plan is not None and plan.fingerprint == current.fingerprint \
                    and held.issuers.get(key_type) == ca.directory:
                replaces = plan.cert_id  # RFC 9773 §5: only the CA that issued it knows it
            try:
                return await self._order_at(domain, key_type, lock, ca, replaces)
            except AcmeError as exc:
                delay = renewal.backoff(failures + 1, self.config.backoff_min, self.config.backoff_max,
                                        exc.retry_after)
                if number + 1 < len(cas) and not exc.config and \
                        renewal.fall_back(exc.kind, exc.validation, time.time(), delay, valid_until):
                    self.stats.count(exc.kind)
                    log.warning("ACME: %s could not issue for %s (%s); ordering from %s", ca.directory, domain,
                                exc, cas[number + 1].directory)
                    continue
                await self._failed(domain, exc)
                return False
        return False

    async def _order_at(self, domain: str, key_type: str, lock: base.Lock, ca: CaEndpoint, replaces: str) -> bool:
        """One order at one CA; raises AcmeError when it gives no certificate."""
        loop = asyncio.get_running_loop()
        account_key = await self._account(ca)
        client = AcmeClient(ca.directory, account_key, self.config.email, ca.ca_bundle)
        issued: Issued = await loop.run_in_executor(self._pool, self._order_blocking, client, ca, domain,
                                                    key_type, replaces, loop)
        try:
            validated = await loop.run_in_executor(
                self._pool, lambda: bundles.validate(issued.chain_pem, issued.key_pem, domain))
        except bundles.BundleError as exc:
            raise AcmeError(f"the ACME server's certificate was refused: {exc}") from None
        meta = CertMeta(domain, CertSource.ACME, validated.key_type, validated.not_before, validated.not_after,
                        validated.fingerprint)
        previous = self.status.get(domain)
        plan = await loop.run_in_executor(self._pool, self._plan_blocking, client, domain, validated.chain_pem,
                                          meta, None)
        # Checked and written under the store's write lock, as domains-remove takes it: a removal
        # racing this order lands wholly before (nothing stored) or after (it deletes this too).
        async with self.store.write_lock():
            attached = domain in self.domains and await self.store.get(base.domain_key(domain)) is not None
            written = attached and await lock.put_if_held(
                base.cert_key(domain, CertSource.ACME, validated.key_type),
                records.encode_bundle(meta, validated.pem, issuer=ca.directory), secret=True)
        if not attached:
            log.info("ACME: %s was removed while its certificate was ordered; not stored", domain)
            self.status.pop(domain, None)
            await self.store.delete(status_key(domain))
            return False
        if not written:
            raise AcmeError("the issuance lock expired before the certificate was stored")
        self.stats.count("valid")
        # What the order carried: the CA may have refused "replaces" (it is then ordered without).
        said = f", replacing {issued.replaced}" if issued.replaced else (
            f"; the CA refused to take it as replacing {replaces}" if replaces else "")
        log.info("ACME: %s certificate for %s in service until %s (from %s%s)", key_type.upper(), domain,
                 _stamp(validated.not_after), ca.directory, said)
        plans = dict(previous.plans or {}) if previous else {}
        plans[validated.key_type] = asdict(plan)
        await self._set_status(domain, DomainStatus("valid", valid_until=validated.not_after, updated=time.time(),
                                                    plans=plans))
        return True

    def _order_blocking(self, client: AcmeClient, ca: CaEndpoint, domain: str, key_type: str, replaces: str,
                        loop: asyncio.AbstractEventLoop) -> Issued:
        """In a thread: the whole RFC 8555 exchange; store writes go through the loop."""

        def on_loop(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

        def publish(kind: str, name: str, value: bytes) -> None:
            if kind == "http-01":
                on_loop(self.store.put_expiring(base.challenge_key(name), value, CHALLENGE_TTL))
            else:
                on_loop(self.store.put_expiring(base.tls_alpn_key(name), value, CHALLENGE_TTL, secret=True))

        def withdraw(kind: str, name: str) -> None:
            key = base.challenge_key(name) if kind == "http-01" else base.tls_alpn_key(name)
            on_loop(self.store.delete(key))

        profile = self.config.profile if ca.profile is None else ca.profile  # a profile named for this CA is checked
        if ca.profile is None and profile and profile not in client.profiles():
            # A fallback CA that names no profile is there to keep a valid certificate: its default will do.
            log.warning("ACME: %s does not offer the profile %r; ordering its default", ca.directory, profile)
            profile = ""
        return client.order(domain, key_type, self.config.challenges, publish, withdraw,
                            profile=profile, replaces=replaces)

    # --- state ----------------------------------------------------------------------------------
    async def failed(self, domain: str, exc: AcmeError) -> None:
        await self._failed(domain, exc)

    async def _failed(self, domain: str, exc: AcmeError) -> None:
        previous = self.status.get(domain)
        failures = (previous.failures if previous else 0) + 1
        delay = renewal.backoff(failures, self.config.backoff_min, self.config.backoff_max, exc.retry_after)
        self.stats.count(exc.kind)
        log.warning("ACME: no certificate for %s (attempt %d): %s; next attempt in %.0f s",
                    domain, failures, exc, delay)
        now = time.time()
        await self._set_status(domain, DomainStatus("failed", failures=failures, last_error=str(exc),
                                                    next_attempt=now + delay, updated=now,
                                                    plans=previous.plans if previous else None))

    async def _set_status(self, domain: str, status: DomainStatus) -> None:
        status.summarize()
        self.status[domain] = status
        try:
            await self.store.put(status_key(domain), status.to_bytes())
        except base.StoreError as exc:
            log.error("cannot record the ACME state of %s: %s", domain, exc)

    async def _keep(self, lock: base.Lock) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            if not await lock.refresh():
                log.warning("ACME: the issuance lock was lost; the certificate will not be written")
                return

    async def _within_rate_limit(self) -> None:
        """No more than ``orders_per_hour`` orders from this node (Let's Encrypt allows 300 per 3 h)."""
        window = 3600.0
        while True:
            now = time.time()
            while self._recent_orders and self._recent_orders[0] < now - window:
                self._recent_orders.popleft()
            if len(self._recent_orders) < self.config.orders_per_hour:
                self._recent_orders.append(now)
                return
            wait = self._recent_orders[0] + window - now
            log.warning("ACME: %d orders in the last hour; the next waits %.0f s",
                        len(self._recent_orders), wait)
            await asyncio.sleep(wait)

    async def _account(self, ca: CaEndpoint) -> bytes:
        return await self._accounts.key(ca.directory, self.config.directory)


def _stamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
