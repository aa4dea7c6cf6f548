"""The etcd store with a real etcd: two nodes follow one store; an etcd
restart and a compacted history while a node was frozen lose nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.store import etcd as etcd_store
from edge.store.etcd import EtcdStore
from tests.integration.conftest import EDGE, EdgeProcess, wait_for
from tests.integration.etcd_server import Etcd, etcd_node


def _status(node: EdgeProcess, host: str) -> str:
    return node.curl(f"https://{host}:{node.https_port}/", "-k", "-o", "/dev/null", "-w", "%{http_code}").stdout


@pytest.fixture
def two_nodes(tmp_path: Path, etcd: Etcd, backend: str) -> Iterator[tuple[EdgeProcess, EdgeProcess]]:
    a, b = etcd_node(tmp_path / "a", etcd), etcd_node(tmp_path / "b", etcd)
    a.cli("apps-add", "demo", "--backend", backend)
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def test_two_nodes_see_a_change_within_a_second(two_nodes, backend: str) -> None:
    a, b = two_nodes
    assert _status(a, "demo.edge.test") == _status(b, "demo.edge.test") == "200"
    b.cli("apps-add", "fresh", "--backend", backend)  # written through node b's CLI, once
    started = time.monotonic()
    wait_for(lambda: _status(a, "fresh.edge.test") == "200" and _status(b, "fresh.edge.test") == "200", timeout=1.0)
    print(f"both nodes serve the new app {1000 * (time.monotonic() - started):.0f} ms after the command returned")


def test_etcd_restart_loses_no_update(two_nodes, etcd: Etcd, backend: str) -> None:
    a, b = two_nodes
    a.cli("apps-add", "before", "--backend", backend)
    etcd.stop()
    time.sleep(0.5)
    etcd.start()
    for i in range(5):
        a.cli("apps-add", f"after{i}", "--backend", backend)
    for node in (a, b):
        wait_for(lambda node=node: all(_status(node, f"after{i}.edge.test") == "200" for i in range(5)), timeout=15)
        assert _status(node, "before.edge.test") == "200"


def test_frozen_node_reloads_after_compaction(two_nodes, etcd: Etcd, backend: str) -> None:
    a, b = two_nodes
    assert b.proc is not None
    # Frozen during its initial load, it would simply load again on waking: the
    # compaction path is the one of a node that follows the watch.
    wait_for(lambda: b"store loaded" in bytes(b.log), timeout=15)
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        # Break the frozen node's watch stream first, so that none of the changes
        # below can reach it (a live stream would hand them to its socket buffer
        # while it is stopped, and it would never need to resume): on waking it
        # must resume from its old revision, which is compacted by then.
        etcd.stop()
        etcd.start()
        for i in range(5):
            a.cli("apps-add", f"while-frozen{i}", "--backend", backend)
        a.cli("apps-remove", "while-frozen0")

        async def compact() -> None:
            store = EtcdStore((etcd.endpoint,))
            async for _ in store.snapshot():  # learns the current revision
                pass
            await store.client.compact(store.revision, physical=True)
            await store.close()

        asyncio.run(compact())
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    wait_for(lambda: all(_status(b, f"while-frozen{i}.edge.test") == "200" for i in range(1, 5)), timeout=15)
    assert _status(b, "while-frozen0.edge.test") == "404"
    # It reloaded in full. The log is read from a pipe by another thread: wait for
    # the line rather than racing it (seen under load).
    wait_for(lambda: b"compacted" in bytes(b.log), timeout=10)


def test_node_refuses_to_start_without_its_store(tmp_path: Path) -> None:
    dead = Etcd(tmp_path)  # ports chosen, server never started
    node = etcd_node(tmp_path / "node", dead)
    result = subprocess.run([EDGE, "serve", "--config", str(node.config)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("edge: error: cannot load the store: etcd at 127.0.0.1:"), last
    check = node.cli("check", check=False)
    assert check.returncode != 0 and "etcd store unreachable" in check.stderr


def test_issuance_lock_lets_exactly_one_node_order(etcd: Etcd) -> None:
    async def scenario() -> None:
        a, b = EtcdStore((etcd.endpoint,)), EtcdStore((etcd.endpoint,))
        locks = await asyncio.gather(a.try_lock("www.example.test", 10), b.try_lock("www.example.test", 10))
        held = [lock for lock in locks if lock is not None]
        assert len(held) == 1  # exactly one node may order this certificate
        winner = held[0]
        assert await winner.refresh()
        assert await winner.put_if_held("certs/acme-ecdsa/www.example.test", b"bundle")
        await winner.release()
        again = await b.try_lock("www.example.test", 1)
        assert again is not None  # free again after release
        # A lock that expired (its node stalled past the TTL) no longer writes.
        await asyncio.sleep(2.5)
        assert not await again.put_if_held("certs/acme-ecdsa/www.example.test", b"stale")
        assert await a.get("certs/acme-ecdsa/www.example.test") == b"bundle"
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_challenge_token_written_by_one_node_is_answered_by_the_other(two_nodes, etcd: Etcd) -> None:
    _a, b = two_nodes

    async def write() -> None:
        store = EtcdStore((etcd.endpoint,))
        await store.put_expiring("acme/challenges/tok-xyz", b"tok-xyz.key-authorization", ttl=2)
        await store.close()

    asyncio.run(write())
    url = f"http://any.example.test:{b.http_port}/.well-known/acme-challenge/tok-xyz"
    assert b.curl(url).stdout == "tok-xyz.key-authorization"
    # The lease expires: the token disappears from every node.
    wait_for(lambda: b.curl(url, "-o", "/dev/null", "-w", "%{http_code}").stdout == "404", timeout=10)


def test_file_store_lock(tmp_path: Path) -> None:
    from edge.store.file import FileStore

    async def scenario() -> None:
        store = FileStore(tmp_path)
        first = await store.try_lock("x.example.test", 10)
        assert first is not None
        assert await FileStore(tmp_path).try_lock("x.example.test", 10) is None
        assert await first.put_if_held("apps/demo", b"{}")
        await first.release()
        assert not await first.put_if_held("apps/demo", b"{}")
        assert await store.try_lock("x.example.test", 10) is not None

    asyncio.run(scenario())


def test_a_store_larger_than_a_grpc_message_loads_in_pages_at_one_revision(etcd: Etcd) -> None:
    # 1,200 bundles of 6 KiB: 7 MiB, over gRPC's default 4 MiB receive limit in one
    # range, and more than two pages. A write between pages is not in the snapshot:
    # every page is read at the first page's revision (the watch then starts after it).
    value = os.urandom(3 * 1024).hex().encode()
    keys = [f"certs/custom-ecdsa/big{n:04}.test" for n in range(1200)]

    async def scenario() -> None:
        writer, reader = EtcdStore((etcd.endpoint,), prefix="/paged/"), EtcdStore((etcd.endpoint,), prefix="/paged/")
        await asyncio.gather(*(writer.put(key, value) for key in keys))
        seen: dict[str, bytes] = {}
        async for key, got in reader.snapshot():
            if not seen:
                await writer.put("zz-written-after-the-first-page", b"late")
            seen[key] = got
        assert len(keys) > 2 * etcd_store.PAGE and len(keys) * len(value) > 4 * 1024 * 1024
        assert sorted(seen) == keys and all(got == value for got in seen.values())
        assert "zz-written-after-the-first-page" not in seen
        assert "zz-written-after-the-first-page" in await reader.items("")
        await writer.close()
        await reader.close()

    asyncio.run(scenario())


def _counting(store: EtcdStore, calls: list[tuple[str, int]]) -> None:
    """Record each Range (and the keys etcd counted in it) and Txn the store sends."""
    stub = store.client.kvstub
    ranges, txns = stub.Range, stub.Txn

    async def counted_range(request, **kwargs):  # type: ignore[no-untyped-def]
        response = await ranges(request, **kwargs)
        calls.append(("range", response.count))
        return response

    async def counted_txn(request, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(("txn", len(request.success)))
        return await txns(request, **kwargs)

    stub.Range, stub.Txn = counted_range, counted_txn


def _fill(etcd: Etcd, prefix: str, items: list[tuple[str, bytes]]) -> None:
    async def put_all() -> None:
        store = EtcdStore((etcd.endpoint,), prefix=prefix)
        await asyncio.gather(*(store.put(key, value) for key, value in items))
        await store.close()

    asyncio.run(put_all())


def test_snapshot_pages_are_ranges_near_their_keys_not_the_rest_of_the_prefix(
        etcd: Etcd, monkeypatch: pytest.MonkeyPatch) -> None:
    # etcd 3.4 counts every key of a range before applying its limit: pages
    # over [page start, end of prefix) cost N²/PAGE (13 s at 100k names).
    # Each page's range ends near its keys: what etcd counts stays a few
    # times the keys read, every key comes once, in order, at one revision.
    monkeypatch.setattr(etcd_store, "PAGE", 50)
    names = [f"{('shop', 'app', 'x')[n % 3]}{n}.example.{('com', 'org')[n % 2]}" for n in range(1500)]
    items = sorted({("apps/a", b"{}"), ("apps/b", b"{}")}
                   | {(f"domains/{n}", b"d") for n in names}
                   | {(f"certs/custom-ecdsa/{n}", b"c") for n in names[::2]}
                   | {(f"certs/acme-rsa/{n}", b"r") for n in names[1::3]}
                   | {(f"acme/status/{n}", b"s") for n in names[:40]})
    _fill(etcd, "/near/", items)

    async def scenario() -> tuple[list[tuple[str, bytes]], list[tuple[str, int]]]:
        writer, reader = EtcdStore((etcd.endpoint,), prefix="/near/"), EtcdStore((etcd.endpoint,), prefix="/near/")
        calls: list[tuple[str, int]] = []
        await reader._connect()
        _counting(reader, calls)
        seen = []
        async for key, value in reader.snapshot():
            if not seen:
                await writer.put("domains/late.example.com", b"after the first page")
            seen.append((key, value))
        await reader.close()
        await writer.close()
        return seen, calls

    seen, calls = asyncio.run(scenario())
    assert seen == items  # in key order, each once; the late write is after the snapshot's revision
    counted = sum(count for _, count in calls)
    # Pages over the rest of the prefix would have counted ~N²/(2 PAGE) = 28 N here.
    assert len(calls) > len(items) // 50 and counted < 8 * len(items), (len(calls), counted)


@pytest.mark.parametrize("page", [1, 3, 16])
def test_snapshot_pages_read_every_key_of_any_shape(etcd: Etcd, monkeypatch: pytest.MonkeyPatch, page: int) -> None:
    # Keys of every length, sharing prefixes or not, with bytes up to UTF-8's
    # largest (0xf4 0x8f 0xbf 0xbf): each comes once, in order, whatever the page.
    import random

    monkeypatch.setattr(etcd_store, "PAGE", page)
    rng = random.Random(page)
    alphabet = ["a", "b", "/", ".", "é", "\U0010ffff", "0"]
    keys = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(200)}
                  | {"a", "aa", "aaa", "ab"}, key=str.encode)
    prefix = f"/shapes{page}/"
    _fill(etcd, prefix, [(key, key.encode()) for key in keys])
    _fill(etcd, prefix[:-1] + "0", [("after", b"x")])  # just past the prefix: not in it

    async def scenario() -> list[str]:
        store = EtcdStore((etcd.endpoint,), prefix=prefix)
        seen = [key async for key, _ in store.snapshot()]
        await store.close()
        return seen

    assert asyncio.run(scenario()) == keys

def test_a_names_entries_are_read_in_one_round_trip(etcd: Etcd) -> None:
    # A handshake for a name not loaded yet waits on this read (the first
    # handshake after a start without a local copy): one transaction, not a get per key.
    _fill(etcd, "/many/", [("domains/a.example.com", b"a"), ("certs/custom-ecdsa/a.example.com", b"c")])

    async def scenario() -> tuple[dict[str, bytes], list[tuple[str, int]]]:
        store = EtcdStore((etcd.endpoint,), prefix="/many/")
        await store._connect()
        calls: list[tuple[str, int]] = []
        _counting(store, calls)
        wanted = ["domains/a.example.com", "certs/custom-ecdsa/a.example.com", "certs/custom-rsa/a.example.com",
                  "domains/*.example.com"]
        got = await store.get_many(wanted)
        many = await store.get_many([f"domains/{n}.example.com" for n in range(300)])  # over etcd's 128 ops
        await store.close()
        assert many == {}
        return got, calls

    got, calls = asyncio.run(scenario())
    assert got == {"domains/a.example.com": b"a", "certs/custom-ecdsa/a.example.com": b"c"}
    assert calls == [("txn", 4), ("txn", 128), ("txn", 128), ("txn", 44)]


def test_a_name_is_served_from_etcd_before_the_first_load_ends(etcd: Etcd, tmp_path: Path) -> None:
    # A host's first start: no local copy. A handshake for a name the load has
    # not reached reads that name from etcd (one transaction) and is served
    # its own certificate; the bundle read goes to the context loader, which
    # then builds the context without reading it again.
    import threading

    from edge.records import CertMeta, encode_bundle
    from edge.store.copywriter import CopyWriter
    from edge.store.follower import StoreFollower
    from edge.store.localcopy import LocalCopy

    pem = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\ny\n"
    names = [f"n{n}.example.com" for n in range(300)]
    bundle = {n: encode_bundle(CertMeta(n, "custom", "ecdsa", 0.0, 2e9, f"fp-{n}"), pem) for n in names}
    _fill(etcd, "/first/", [("apps/a", b'{"backends": ["127.0.0.1:1"]}')]
          + [(f"domains/{n}", b'{"app": "a"}') for n in names]
          + [(f"certs/custom-ecdsa/{n}", bundle[n]) for n in names])
    copy = LocalCopy(tmp_path / "index", "etcd:test", rebuild=True)
    writer = CopyWriter(copy)
    held = threading.Event()

    async def scenario() -> None:
        store = EtcdStore((etcd.endpoint,), prefix="/first/")
        kept: dict[str, bytes] = {}
        follower = StoreFollower(store, copy, writer, on_cert=kept.__setitem__)
        await follower.start()
        writer._run(held.wait)  # the copy's writer is busy: the load cannot end before the name is asked for
        try:
            await follower.ensure("n250.example.com")
            assert not follower.loaded.is_set()
            app, certs = follower.index.record("n250.example.com")  # type: ignore[misc]
            assert app == "a" and [m.fingerprint for m in certs] == ["fp-n250.example.com"]
            assert kept == {"certs/custom-ecdsa/n250.example.com": bundle["n250.example.com"]}
            assert copy.name("n250.example.com") is None  # from the store, not the copy
        finally:
            held.set()
        await asyncio.wait_for(follower.loaded.wait(), 30)
        assert copy.names_count() == len(names)
        follower.close()
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        held.set()
        writer.close()
        copy.close()
