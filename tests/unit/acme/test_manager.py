"""The ACME renewal policy (SPEC §2, §7) as pure functions, the manager's
bookkeeping, and the TLS-ALPN-01 validation certificate (RFC 8737 §3)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edge.acme.client import ACME_IDENTIFIER_OID, tls_alpn_certificate
from edge.acme.renewal import STANDBY_BEFORE, DomainStatus, backoff, needs, renew_at
from edge.records import CertMeta, DomainCerts

DAY = 86400.0
NOW = 1_800_000_000.0


def held(*metas: CertMeta) -> DomainCerts:
    out = DomainCerts()
    for meta in metas:
        out = out.replaced(meta)
    return out


def cert(source: str, key_type: str, not_before: float, not_after: float) -> CertMeta:
    return CertMeta("www.example.com", source, key_type, not_before, not_after, f"{source}{key_type}{not_after}")


def test_no_certificate_at_all_orders_every_key_type():
    assert needs(None, ("ecdsa", "rsa"), NOW) == (["ecdsa", "rsa"], None)


def test_custom_far_from_expiry_needs_nothing_until_the_standby_window():
    custom = cert("custom", "ecdsa", NOW - 10 * DAY, NOW + 60 * DAY)
    due, later = needs(held(custom), ("ecdsa",), NOW)
    assert due == [] and later == NOW + 60 * DAY - STANDBY_BEFORE


def test_custom_within_14_days_gets_a_standby():
    custom = cert("custom", "ecdsa", NOW - 80 * DAY, NOW + 13 * DAY)
    assert needs(held(custom), ("ecdsa",), NOW)[0] == ["ecdsa"]


def test_expired_custom_counts_as_missing():
    custom = cert("custom", "rsa", NOW - 90 * DAY, NOW - 1)
    assert needs(held(custom), ("ecdsa",), NOW)[0] == ["ecdsa"]


def test_the_longest_lived_custom_decides():
    # An ECDSA custom about to expire, an RSA custom good for months: still served by custom.
    metas = held(cert("custom", "ecdsa", NOW - 80 * DAY, NOW + 2 * DAY),
                 cert("custom", "rsa", NOW - DAY, NOW + 89 * DAY))
    assert needs(metas, ("ecdsa",), NOW)[0] == []


def test_acme_renewed_at_two_thirds_of_its_lifetime():
    acme = cert("acme", "ecdsa", NOW - 30 * DAY, NOW + 60 * DAY)
    assert renew_at(acme) == NOW + 30 * DAY
    due, later = needs(held(acme), ("ecdsa",), NOW)
    assert due == [] and later == NOW + 30 * DAY
    assert needs(held(acme), ("ecdsa",), NOW + 30 * DAY)[0] == ["ecdsa"]


def test_each_key_type_on_its_own():
    acme = cert("acme", "ecdsa", NOW - DAY, NOW + 89 * DAY)
    assert needs(held(acme), ("ecdsa", "rsa"), NOW)[0] == ["rsa"]


def test_backoff_doubles_is_capped_and_honours_retry_after():
    assert [backoff(n, 60, 3600) for n in (1, 2, 3, 4, 10)] == [60, 120, 240, 480, 3600]
    assert backoff(1, 60, 3600, retry_after=1800) == 1800
    assert backoff(3, 60, 3600, retry_after=10) == 240


def test_status_round_trip_and_garbage():
    status = DomainStatus("failed", failures=2, last_error="boom", next_attempt=NOW, updated=NOW - 5)
    assert DomainStatus.from_bytes(status.to_bytes()) == status
    assert DomainStatus.from_bytes(b"not json") is None


@pytest.mark.parametrize("domain", ["www.example.com", "xn--bcher-kva.example"])
def test_tls_alpn_certificate_carries_the_key_authorization_digest(domain: str):
    pem = tls_alpn_certificate(domain, "token.thumbprint")
    leaf = x509.load_pem_x509_certificate(pem)
    load_pem_private_key(pem, None)  # the key travels in the same PEM
    extension = leaf.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert extension.critical
    # DER OCTET STRING (tag 4, length 32) of SHA-256(key authorization)
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [domain]


# --- the manager's bookkeeping, on a real file store ---------------------------------------

def test_failed_state_is_cleared_once_a_custom_certificate_serves(tmp_path):
    import asyncio
    import time

    from edge.acme.manager import AcmeManager
    from edge.acme.orders import status_key
    from edge.config import AcmeConfig
    from edge.store.file import FileStore
    from edge.store.index import Index

    async def run() -> None:
        store = FileStore(tmp_path)
        index = Index()
        index.domains["www.example.com"] = "shop"
        now = time.time()
        index.certs["www.example.com"] = held(cert("custom", "ecdsa", now - DAY, now + 60 * DAY))
        manager = AcmeManager(AcmeConfig(enabled=True), store, index)
        failed = DomainStatus("failed", failures=3, last_error="DNS", next_attempt=now + 600, updated=now)
        manager.status["www.example.com"] = failed
        await store.put(status_key("www.example.com"), failed.to_bytes())
        manager.status["gone.example.com"] = failed  # a domain removed meanwhile
        await store.put(status_key("gone.example.com"), failed.to_bytes())
        await manager._scan()
        await asyncio.gather(*manager._tasks)  # the status deletes it started
        assert manager.status == {}
        assert await store.items("acme/status/") == {}
        # Nothing is due before the standby window: the schedule stays empty (cheap at 1M names).
        assert manager._due == {}

    asyncio.run(run())


def test_server_problems_become_clear_errors_with_retry_after():
    from acme import messages

    from edge.acme.client import AcmeClient, AcmeError, _retry_after_seconds, new_account_key

    client = AcmeClient("https://acme.invalid/directory", new_account_key())

    def rate_limited() -> None:
        client.net.last_retry_after = "120"
        raise messages.Error(typ="urn:ietf:params:acme:error:rateLimited", detail="too many certificates")

    with pytest.raises(AcmeError) as exc:
        client._call("ordering a certificate for www.example.com", rate_limited)
    assert exc.value.kind == "rate_limited" and exc.value.retry_after == 120
    assert "rateLimited: too many certificates" in str(exc.value)

    # A real connection to a port where nothing listens.
    nowhere = AcmeClient("https://127.0.0.1:1/directory", new_account_key(), timeout=5)
    with pytest.raises(AcmeError) as exc:
        nowhere.register()
    assert exc.value.kind == "unreachable"
    assert str(exc.value).startswith("reading the ACME directory: cannot reach the ACME server https://127.0.0.1:1/")
    assert _retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert _retry_after_seconds("garbage") is None


def test_orders_per_hour_is_a_ceiling(tmp_path):
    import asyncio
    import time

    from edge.acme.manager import AcmeManager
    from edge.config import AcmeConfig
    from edge.store.file import FileStore
    from edge.store.index import Index

    async def run() -> None:
        manager = AcmeManager(AcmeConfig(enabled=True, orders_per_hour=2), FileStore(tmp_path), Index())
        orders = manager.orders
        await orders._within_rate_limit()
        await orders._within_rate_limit()
        with pytest.raises(TimeoutError):  # the third order of the hour waits
            await asyncio.wait_for(orders._within_rate_limit(), 0.3)
        # An hour later the budget is back.
        orders._recent_orders.clear()
        orders._recent_orders.extend([time.time() - 3700, time.time() - 3650])
        await asyncio.wait_for(orders._within_rate_limit(), 0.3)
        assert len(orders._recent_orders) == 1

    asyncio.run(run())


def test_renewal_gauges_are_aggregates_without_a_label_per_domain(tmp_path):
    from edge.acme.manager import AcmeManager
    from edge.config import AcmeConfig
    from edge.store.file import FileStore
    from edge.store.index import Index

    manager = AcmeManager(AcmeConfig(enabled=True), FileStore(tmp_path), Index())
    now = NOW
    manager._planned = {
        "a.example.com": (now + 100, "ari", now + 100, False),
        "b.example.com": (now + 60, "retry", now - 2 * 3600, False),  # its renewal failed 2 h ago: overdue
        "c.example.com": (now + 3 * DAY, "lifetime", now + 3 * DAY, True),  # from a fallback CA
        "d.example.com": (now - 600, "ari", now - 600, False),  # due 10 minutes ago: late, not yet overdue
    }
    gauges = manager.renewal_gauges(now)
    assert gauges == {"next": -600, "overdue": 1, "reason_ari": 2, "reason_lifetime": 1, "reason_retry": 1,
                      "ca_primary": 3, "ca_fallback": 1}
    manager._planned.clear()
    assert manager.renewal_gauges(now + 1) == gauges  # kept a while: a scrape does not walk every domain
    assert "next" not in manager.renewal_gauges(now + 60)  # run() refreshes it every 30 s


def test_a_scan_with_everything_due_starts_a_bounded_number_of_turns(tmp_path):
    """After an upgrade every certificate's renewal information is due at once: the
    manager keeps a queue of names, not a task per domain."""
    import asyncio
    import time

    from edge.acme.manager import MAX_TURNS, SCAN_CHUNK, AcmeManager
    from edge.config import AcmeConfig
    from edge.store.file import FileStore
    from edge.store.index import Index

    async def run() -> None:
        index = Index()
        now = time.time()
        for n in range(SCAN_CHUNK - 1):  # one scan chunk: nothing runs before the counts are read
            name = f"d{n}.example.com"
            index.domains[name] = "shop"
            index.certs[name] = held(CertMeta(name, "acme", "ecdsa", now - DAY, now + 89 * DAY, f"fp{n}"))
        manager = AcmeManager(AcmeConfig(enabled=True, directory="https://127.0.0.1:1/dir"), FileStore(tmp_path),
                              index)
        await manager._scan()
        assert len(manager._running) == len(manager._tasks) == MAX_TURNS
        assert len(manager._waiting) == len(manager._waiting_set) == SCAN_CHUNK - 1 - MAX_TURNS
        for task in list(manager._tasks):
            task.cancel()
        await asyncio.sleep(0)
        manager._pool.shutdown(wait=False, cancel_futures=True)

    asyncio.run(run())
