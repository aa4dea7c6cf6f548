"""What to order from the ACME server, and when (SPEC §2, §7).

Every custom domain (not a wildcard) gets an acme certificate of each
configured key type when it has no custom certificate that stays valid for
more than ``STANDBY_BEFORE``: no custom certificate at all, a deleted one, an
expired one, or one close to its end (the *standby*, so that a lapse or a
deletion falls through to acme at once, SPEC §2 rule 2). An acme certificate
is renewed once two thirds of its lifetime have passed.

Orders run in a thread (``edge.acme.client`` blocks); their results go into
the store, so every process and node serves them. A per-domain lock in the
store lets one node of a fleet order a given certificate; the certificate is
written only while that lock is still held. After a failure a domain waits
``backoff_min * 2**(failures-1)`` seconds (capped at ``backoff_max``, and at
least what the server's Retry-After says) before the next attempt. Each
domain's state is kept in the store (``acme/status/<domain>``) for
``edge domains`` and for the other nodes.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from edge.acme.client import AcmeClient, AcmeError, Issued, new_account_key
from edge.config import AcmeConfig
from edge.store import base
from edge.store.index import KEY_TYPES, SOURCES, CertMeta, DomainCerts, EntryError, Index, bundle_header, parse_cert
from edge.tls import bundle as bundles
from edge.tls import names

log = logging.getLogger(__name__)

STANDBY_BEFORE = 14 * 86400  # SPEC §2: a custom certificate this close to expiry gets an acme standby
RENEW_AFTER = 2 / 3  # SPEC §7: renew at two thirds of the lifetime
LOCK_TTL = 60  # seconds; refreshed every LOCK_TTL / 3 while an order runs
CHALLENGE_TTL = 600  # seconds a published challenge answer lives in the store
CONCURRENT_ORDERS = 2
BUSY_RETRY = 30.0  # another node holds the domain's lock: look again after this
SCAN_CHUNK = 2000  # domains examined between two yields to the event loop
# Every domain is examined once per RESCAN; only what falls due before the
# next one is kept in the schedule, so a million quiet domains cost no memory.
RESCAN = 3600.0


@dataclass
class DomainStatus:
    """``acme/status/<domain>``: what the manager last did for a domain."""

    state: str  # "pending" (an order runs), "valid", "failed"
    failures: int = 0  # consecutive failures
    last_error: str | None = None
    next_attempt: float | None = None  # not before (back-off), POSIX seconds
    valid_until: float | None = None
    updated: float = 0.0

    def to_bytes(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, value: bytes) -> DomainStatus | None:
        try:
            data = json.loads(value)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError):
            return None


def renew_at(meta: CertMeta) -> float:
    return meta.not_before + RENEW_AFTER * (meta.not_after - meta.not_before)


def needs(held: DomainCerts | None, key_types: tuple[str, ...], now: float) -> tuple[list[str], float | None]:
    """(key types to order now, when to look again otherwise) for one domain.

    Pure: the whole policy of SPEC §2/§7 in one place, unit-tested as such."""
    custom = held.valid("custom", now) if held else ()
    custom_end = max((m.not_after for m in custom), default=None)
    if custom_end is not None and custom_end - now > STANDBY_BEFORE:
        return [], custom_end - STANDBY_BEFORE  # served by its custom certificate; standby later
    due: list[str] = []
    later: list[float] = []
    acme = held.of("acme") if held else ()
    for key_type in key_types:
        mine = [m for m in acme if m.key_type == key_type and m.not_after > now]
        if not mine:
            due.append(key_type)
            continue
        when = renew_at(max(mine, key=lambda m: m.not_after))
        if when <= now:
            due.append(key_type)
        else:
            later.append(when)
    return due, min(later, default=None)


def backoff(failures: int, minimum: float, maximum: float, retry_after: float | None = None) -> float:
    delay = min(maximum, minimum * 2 ** max(0, failures - 1))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def status_key(domain: str) -> str:
    return base.ACME_STATUS + domain


@dataclass
class AcmeStats:
    """Orders by result, for ``edge_acme_orders_total`` (SPEC §8)."""

    orders: dict[str, int] = field(default_factory=lambda: {"valid": 0, "failed": 0, "rate_limited": 0,
                                                             "unreachable": 0})

    def count(self, result: str) -> None:
        self.orders[result] = self.orders.get(result, 0) + 1


class AcmeManager:
    def __init__(self, config: AcmeConfig, store: base.Store, index: Index) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.stats = AcmeStats()
        self.status: dict[str, DomainStatus] = {}
        self._due: dict[str, float] = {}  # domain -> when to look at it next (authoritative)
        self._heap: list[tuple[float, str]] = []  # (time, domain), lazily pruned against _due
        self._running: set[str] = set()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(CONCURRENT_ORDERS)
        self._recent_orders: collections.deque[float] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=CONCURRENT_ORDERS, thread_name_prefix="edge-acme")
        self._account_key: bytes | None = None
        self._scan_requested = True

    # --- what the server tells us ---------------------------------------------------------
    def notice(self, key: str) -> None:
        """A store change: look at the domain it concerns again, now."""
        if key.startswith(base.DOMAINS):
            domain = key[len(base.DOMAINS):]
        elif (parts := base.parse_cert_key(key)) is not None:
            domain = parts[0]
        else:
            return
        self._schedule(domain, 0.0)
        self._wake.set()

    def rescan(self) -> None:
        """After a full reload of the index: look at every domain again."""
        self._scan_requested = True
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        log.info("ACME manager on %s (key types %s; challenges %s)", self.config.directory,
                 ", ".join(self.config.key_types), ", ".join(self.config.challenges))
        while self.index.loading:
            # A half-loaded index would look like domains without certificates.
            await asyncio.sleep(0.2)
        await self._load_status()
        self._scan_requested = True
        next_scan = 0.0
        try:
            while True:
                if self._scan_requested or time.time() >= next_scan:
                    self._scan_requested = False
                    next_scan = time.time() + RESCAN
                    await self._scan()
                now = time.time()
                while self._heap and self._heap[0][0] <= now:
                    when, domain = heapq.heappop(self._heap)
                    if self._due.get(domain) != when:
                        continue  # superseded by a later schedule
                    del self._due[domain]
                    self._look_at(domain, now)
                    await asyncio.sleep(0)
                wake_at = min(self._heap[0][0], next_scan) if self._heap else next_scan
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - time.time()))
                except TimeoutError:
                    pass
        finally:
            for task in self._tasks:
                task.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _load_status(self) -> None:
        try:
            stored = await self.store.items(base.ACME_STATUS)
        except base.StoreError as exc:
            log.error("cannot read the ACME states from the store: %s", exc)
            return
        for key, value in stored.items():
            status = DomainStatus.from_bytes(value)
            if status is not None:
                self.status[key[len(base.ACME_STATUS):]] = status

    async def _scan(self) -> None:
        self._due.clear()
        self._heap.clear()
        now = time.time()
        for number, domain in enumerate(list(self.index.domains)):
            self._look_at(domain, now)
            if number % SCAN_CHUNK == SCAN_CHUNK - 1:
                await asyncio.sleep(0)
                now = time.time()
        for domain in [d for d in self.status if d not in self.index.domains]:
            self._forget(domain)  # removed while this node was not watching

    def _schedule(self, domain: str, when: float) -> None:
        if when > time.time() + RESCAN:
            return  # the next scan looks at it again
        current = self._due.get(domain)
        if current is not None and current <= when:
            return
        self._due[domain] = when
        heapq.heappush(self._heap, (when, domain))

    def _look_at(self, domain: str, now: float) -> None:
        if domain in self._running or self.index.loading:
            return  # its order's end looks again; the end of loading rescans
        if domain not in self.index.domains:
            if domain in self.status:
                self._forget(domain)
            return
        if names.is_wildcard(domain):
            return  # no HTTP-01/TLS-ALPN-01 for wildcards (RFC 8555 §7.1.3); refused at domains-add
        due, later = needs(self.index.certs.get(domain), self.config.key_types, now)
        status = self.status.get(domain)
        if not due:
            if status is not None and status.state == "failed":
                self._forget(domain)  # a custom certificate made the failures moot
            if later is not None:
                self._schedule(domain, later)
            return
        if status is not None and status.next_attempt is not None and status.next_attempt > now:
            self._schedule(domain, status.next_attempt)  # backing off
            return
        self._running.add(domain)
        task = asyncio.get_running_loop().create_task(self._obtain(domain))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one domain's orders --------------------------------------------------------------
    async def _obtain(self, domain: str) -> None:
        look_again = 0.0  # at once: the next key type, or the next renewal date
        try:
            async with self._slots:
                lock = await self.store.try_lock(f"acme/{domain}", LOCK_TTL)
                if lock is None:
                    log.info("ACME: another node is ordering for %s; looking again in %.0f s", domain, BUSY_RETRY)
                    look_again = time.time() + BUSY_RETRY
                    return
                refresher = asyncio.get_running_loop().create_task(self._keep(lock))
                try:
                    # Another node may have just finished (or failed) this order and let
                    # the lock go: decide again from the store, which its writes reached first.
                    shared = await self.store.get(status_key(domain))
                    status = DomainStatus.from_bytes(shared) if shared is not None else None
                    if status is not None and status.next_attempt is not None and status.next_attempt > time.time():
                        self.status[domain] = status
                        look_again = status.next_attempt
                        return
                    key_types = await self._still_needed(domain)
                    if key_types:
                        await self._within_rate_limit()
                    for key_type in key_types:
                        if not await self._order_one(domain, key_type, lock):
                            break
                finally:
                    refresher.cancel()
                    await lock.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the manager must outlive any one order
            log.exception("ACME order for %s failed unexpectedly: %s", domain, exc)
            await self._failed(domain, AcmeError(f"internal error: {exc}"))
        finally:
            self._running.discard(domain)
            self._schedule(domain, look_again)
            self._wake.set()

    def _forget(self, domain: str) -> None:
        """Drop a state that no longer says anything (domain removed, custom certificate uploaded)."""
        self.status.pop(domain, None)

        async def delete() -> None:
            try:
                await self.store.delete(status_key(domain))
            except base.StoreError as exc:
                log.error("cannot clear the ACME state of %s: %s", domain, exc)

        task = asyncio.get_running_loop().create_task(delete())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _still_needed(self, domain: str) -> list[str]:
        held = DomainCerts()
        for source in SOURCES:
            for key_type in KEY_TYPES:
                key = base.cert_key(domain, source, key_type)
                value = await self.store.get(key)
                if value is None:
                    continue
                try:
                    held = held.replaced(parse_cert(key, value))
                except EntryError:
                    continue  # a broken entry is no certificate
        return needs(held, self.config.key_types, time.time())[0]

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

    async def _order_one(self, domain: str, key_type: str, lock: base.Lock) -> bool:
        previous = self.status.get(domain)
        await self._set_status(domain, DomainStatus(
            "pending", failures=previous.failures if previous else 0,
            last_error=previous.last_error if previous else None, updated=time.time()))
        loop = asyncio.get_running_loop()
        try:
            account_key = await self._account()
            issued: Issued = await loop.run_in_executor(self._pool, self._order_blocking, account_key, domain,
                                                        key_type, loop)
            validated = await loop.run_in_executor(
                self._pool, lambda: bundles.validate(issued.chain_pem, issued.key_pem, domain)
            )
        except AcmeError as exc:
            await self._failed(domain, exc)
            return False
        except bundles.BundleError as exc:
            await self._failed(domain, AcmeError(f"the ACME server's certificate was refused: {exc}"))
            return False
        if domain not in self.index.domains:
            log.info("ACME: %s was removed while its certificate was ordered; not stored", domain)
            self.status.pop(domain, None)
            await self.store.delete(status_key(domain))
            return False
        meta = CertMeta(domain, "acme", validated.key_type, validated.not_before, validated.not_after,
                        validated.fingerprint)
        written = await lock.put_if_held(base.cert_key(domain, "acme", validated.key_type),
                                         bundle_header(meta) + validated.pem, secret=True)
        if not written:
            await self._failed(domain, AcmeError("the issuance lock expired before the certificate was stored"))
            return False
        self.stats.count("valid")
        log.info("ACME: %s certificate for %s in service until %s", key_type.upper(), domain,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(validated.not_after)))
        await self._set_status(domain, DomainStatus("valid", valid_until=validated.not_after, updated=time.time()))
        return True

    def _order_blocking(self, account_key: bytes, domain: str, key_type: str,
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

        acme = AcmeClient(self.config.directory, account_key, self.config.email, self.config.ca_bundle)
        return acme.order(domain, key_type, self.config.challenges, publish, withdraw)

    async def _failed(self, domain: str, exc: AcmeError) -> None:
        previous = self.status.get(domain)
        failures = (previous.failures if previous else 0) + 1
        delay = backoff(failures, self.config.backoff_min, self.config.backoff_max, exc.retry_after)
        self.stats.count(exc.kind)
        log.warning("ACME: no certificate for %s (attempt %d): %s; next attempt in %.0f s",
                    domain, failures, exc, delay)
        now = time.time()
        await self._set_status(domain, DomainStatus("failed", failures=failures, last_error=str(exc),
                                                    next_attempt=now + delay, updated=now))

    async def _set_status(self, domain: str, status: DomainStatus) -> None:
        self.status[domain] = status
        try:
            await self.store.put(status_key(domain), status.to_bytes())
        except base.StoreError as exc:
            log.error("cannot record the ACME state of %s: %s", domain, exc)

    async def _account(self) -> bytes:
        """The account key, created once and kept in the store (0600)."""
        if self._account_key is not None:
            return self._account_key
        try:
            stored = await self.store.get(base.ACME_ACCOUNT)
            if stored is None:
                lock = await self.store.try_lock("acme-account", LOCK_TTL)
                if lock is None:
                    raise AcmeError("another node is creating the ACME account key", "failed", 5.0)
                try:
                    stored = await self.store.get(base.ACME_ACCOUNT)
                    if stored is None:
                        stored = await asyncio.get_running_loop().run_in_executor(self._pool, new_account_key)
                        if not await lock.put_if_held(base.ACME_ACCOUNT, stored, secret=True):
                            raise AcmeError("lost the lock while storing the ACME account key")
                        log.info("ACME: account key created and stored")
                finally:
                    await lock.release()
        except base.StoreError as exc:
            raise AcmeError(f"cannot read or write the ACME account key: {exc}", "failed") from None
        self._account_key = stored
        return stored
