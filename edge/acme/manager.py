"""What to look at, and when: the ACME manager's schedule (SPEC §2, §7).

The policy (what a domain needs, when a certificate is renewed: RFC 9773
renewal information or two thirds of its lifetime) is ``edge.acme.renewal``;
what happens under a domain's lock (renewal information, orders, the CA to
order from) is ``edge.acme.orders``. This module keeps the schedule: every
domain is examined once per ``RESCAN``, and what falls due before the next
one (an order, a renewal, a renewal-information check, the end of a back-off)
is kept in a heap. Each domain's state is kept in the store
(``acme/status/<domain>``) for ``edge domains`` and for the other nodes.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from edge import names
from edge.acme import renewal
from edge.acme.client import AcmeClient, AcmeError, new_account_key
from edge.acme.orders import AcmeStats, Orders, status_key
from edge.acme.renewal import DomainStatus
from edge.acme.settings import CaEndpoint
from edge.config import AcmeConfig, Config
from edge.records import DomainCerts
from edge.store import base
from edge.store.index import Index

log = logging.getLogger(__name__)

CONCURRENT_ORDERS = 2
MAX_TURNS = 200  # domains with a turn started (waiting for one of CONCURRENT_ORDERS slots, or in one)
SCAN_CHUNK = 500  # domains examined between two yields to the event loop (~6 ms with ARI plans)
# Every domain is examined once per RESCAN; only what falls due before the
# next one is kept in the schedule, so a million quiet domains cost no memory.
RESCAN = 3600.0
GAUGES_TTL = 30.0  # at most this many seconds between two computations of the renewal gauges


class AcmeManager:
    def __init__(self, config: AcmeConfig, store: base.Store, index: Index, loaded: asyncio.Event | None = None
                 ) -> None:
        self.store = store
        self.index = index
        self.loaded = loaded  # the store follower's (None: the index is complete)
        self.status: dict[str, DomainStatus] = {}
        self._due: dict[str, float] = {}  # domain -> when to look at it next (authoritative)
        self._heap: list[tuple[float, str]] = []  # (time, domain), lazily pruned against _due
        self._running: set[str] = set()
        self._waiting: collections.deque[str] = collections.deque()  # due, beyond MAX_TURNS
        self._waiting_set: set[str] = set()
        self._stopping = False
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(CONCURRENT_ORDERS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=CONCURRENT_ORDERS, thread_name_prefix="edge-acme")
        self.orders = Orders(config, store, self.status, index.domains, self._pool, collections.deque())
        self._config = config
        self._scan_requested = True
        # domain -> (next planned renewal or retry, its reason, when its certificates fall due,
        # whether one of them came from a fallback CA)
        self._planned: dict[str, tuple[float, str, float | None, bool]] = {}
        self._gauges: tuple[float, dict[str, float]] | None = None

    @property
    def config(self) -> AcmeConfig:
        return self._config

    def reconfigure(self, config: Config) -> None:
        """A reload: the next order uses the new directory, profile, key types,
        back-off. Turning ACME off needs a restart: the running settings stay."""
        if config.acme.enabled:
            self._config = config.acme
            self.orders.config = config.acme

    @property
    def stats(self) -> AcmeStats:
        return self.orders.stats

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
        for ca in self.config.fallback_directories:  # a fallback's own profile, checked in the background
            if ca.profile:
                task = asyncio.get_running_loop().create_task(self._check_profile(ca))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        log.info("ACME manager on %s (key types %s; challenges %s; profile %s; fallbacks %s)",
                 self.config.directory, ", ".join(self.config.key_types), ", ".join(self.config.challenges),
                 self.config.profile or "the CA's default", ", ".join(
                     ca.directory + (f" (profile {ca.profile or 'its default'})" if ca.profile is not None else "")
                     for ca in self.config.fallback_directories) or "none")
        if self.config.profile:
            await self._check_profile()
        if self.loaded is not None:
            await self.loaded.wait()  # a half-loaded index would look like domains without certificates
        await self._load_status()
        self._scan_requested = True
        next_scan = 0.0
        gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())
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
            self._stopping = True
            gauges.cancel()
            for task in self._tasks:
                task.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _check_profile(self, ca: CaEndpoint | None = None) -> None:
        """At start: an unknown profile (``[acme] profile``, or one a fallback CA names) is said
        at once, naming what that CA offers. (Every order checks it again, and fails with the
        same message, when the CA is reached.)"""
        ca = ca or self.config.cas[0]
        client = AcmeClient(ca.directory, new_account_key(), ca_bundle=ca.ca_bundle)
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, client.check_profile, ca.profile or "")
        except AcmeError as exc:
            log.log(logging.ERROR if exc.config else logging.WARNING, "ACME: %s", exc)

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
        if domain in self._running or (self.loaded is not None and not self.loaded.is_set()):
            return  # its turn's end looks again; the end of loading rescans
        if domain not in self.index.domains:
            if domain in self.status:
                self._forget(domain)
            return
        if names.is_wildcard(domain):
            return  # no HTTP-01/TLS-ALPN-01 for wildcards (RFC 8555 §7.1.3); refused at domains-add
        held = self.index.certs.get(domain)
        status = self.status.get(domain)
        due, later = renewal.needs(held, self.config.key_types, now, status)
        checks = renewal.ari_checks(held, self.config.key_types, now, status)
        self._note_plan(domain, held, now, status)
        if not due and not checks:
            if status is not None and status.state == "failed":
                self._forget(domain)  # a custom certificate made the failures moot
            if later is not None:
                self._schedule(domain, later)
            return
        if status is not None and status.next_attempt is not None and status.next_attempt > now:
            self._schedule(domain, status.next_attempt)  # backing off
            return
        if len(self._running) >= MAX_TURNS:
            # Say, the first scan after an upgrade: every certificate's renewal information
            # is due at once. A queue of names, not a million tasks.
            if domain not in self._waiting_set:
                self._waiting.append(domain)
                self._waiting_set.add(domain)
            return
        self._running.add(domain)
        task = asyncio.get_running_loop().create_task(self._turn(domain))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one domain's turn ------------------------------------------------------------------
    async def _turn(self, domain: str) -> None:
        look_again = 0.0  # at once: the next key type, or the next renewal date
        try:
            async with self._slots:
                look_again = await self.orders.turn(domain)
        except asyncio.CancelledError:
            self._stopping = True  # edge stops: start nothing more
            raise
        except Exception as exc:  # the manager must outlive any one order
            log.exception("ACME order for %s failed unexpectedly: %s", domain, exc)
            await self.orders.failed(domain, AcmeError(f"internal error: {exc}"))
        finally:
            self._running.discard(domain)
            self._schedule(domain, look_again)
            while self._waiting and len(self._running) < MAX_TURNS and not self._stopping:
                waiting = self._waiting.popleft()
                self._waiting_set.discard(waiting)
                self._look_at(waiting, time.time())
            self._wake.set()

    def _forget(self, domain: str) -> None:
        """Drop a state that no longer says anything (domain removed, custom certificate uploaded)."""
        self.status.pop(domain, None)
        self._planned.pop(domain, None)

        async def delete() -> None:
            try:
                await self.store.delete(status_key(domain))
            except base.StoreError as exc:
                log.error("cannot clear the ACME state of %s: %s", domain, exc)

        task = asyncio.get_running_loop().create_task(delete())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- renewal gauges (SPEC §8: aggregates, no per-domain label) -----------------------------
    def _note_plan(self, domain: str, held: DomainCerts | None, now: float, status: DomainStatus | None) -> None:
        planned = renewal.soonest(held, self.config.key_types, now, status)
        if planned is None:
            self._planned.pop(domain, None)
            return
        issuers = {p.issuer for p in (status.plan(k) for k in status.plans or {}) if p is not None} if status else set()
        self._planned[domain] = (*planned, bool(issuers - {self.config.directory}))

    def renewal_gauges(self, now: float | None = None) -> dict[str, float]:
        """The renewal gauges as last computed (in a thread, by ``run``: every second, up to
        ``GAUGES_TTL`` for a million domains); computed here when there are none. See
        ``renewal_gauges_of``."""
        now = time.time() if now is None else now
        if self._gauges is None or now - self._gauges[0] >= 2 * GAUGES_TTL:
            self._gauges = (now, renewal_gauges_of(list(self._planned.values()), now))
        return self._gauges[1]

    async def _refresh_gauges(self) -> None:
        """Walking a million plans takes ~0.3 s: not on the event loop, and not per scrape."""
        while True:
            now = time.time()
            snapshot = list(self._planned.values())  # a copy: the loop keeps changing the dict
            self._gauges = (now, await asyncio.to_thread(renewal_gauges_of, snapshot, now))
            # Every second for a small fleet; at most ~2 % of a core for a large one.
            await asyncio.sleep(min(GAUGES_TTL, max(1.0, 50 * (time.time() - now))))


def renewal_gauges_of(planned: list[tuple[float, str, float | None, bool]], now: float) -> dict[str, float]:
    """``next`` (seconds to the soonest planned renewal or retry, negative when late),
    ``overdue`` (domains whose certificates' planned renewal passed ``OVERDUE_AFTER``
    ago), ``reason_<r>`` (domains whose next renewal is planned for reason r),
    ``ca_primary``/``ca_fallback`` (domains whose certificates all come from the primary
    CA / one of them from a fallback CA)."""
    out: dict[str, float] = {f"reason_{r}": 0 for r in renewal.REASONS}
    out.update(overdue=0, ca_primary=0, ca_fallback=0)
    soonest = None
    for when, reason, certs_due, fallback in planned:
        out[f"reason_{reason}"] += 1
        out["ca_fallback" if fallback else "ca_primary"] += 1
        soonest = when if soonest is None else min(soonest, when)
        if certs_due is not None and certs_due < now - renewal.OVERDUE_AFTER:
            out["overdue"] += 1
    if soonest is not None:
        out["next"] = soonest - now
    return out
