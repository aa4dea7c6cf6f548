import asyncio
import stat

from edge.store.base import EventKind, cert_key
from edge.store.file import FileStore


def test_key_path_mapping_round_trips(tmp_path):
    store = FileStore(tmp_path)
    for key in ("apps/demo", "domains/www.example.com", "domains/*.example.com",
                cert_key("*.example.com", "custom", "ecdsa")):
        path = store.path_of(key)
        assert "*" not in str(path)  # shell-friendly file names
        assert store.key_of(path) == key
    assert store.path_of("domains/*.example.com") == tmp_path / "domains" / "_.example.com.json"
    assert store.key_of(tmp_path / "domains" / ".tmp-abc") is None


def test_put_get_delete_and_modes(tmp_path):
    store = FileStore(tmp_path)

    async def run():
        await store.put("apps/demo", b'{"backends": []}')
        await store.put(cert_key("a.example.com", "custom", "rsa"), b"secret", secret=True)
        assert await store.get("apps/demo") == b'{"backends": []}'
        assert await store.get("apps/none") is None
        assert await store.delete("apps/demo") is True
        assert await store.delete("apps/demo") is False
        return [item async for item in store.snapshot()]

    items = asyncio.run(run())
    assert items == [(cert_key("a.example.com", "custom", "rsa"), b"secret")]
    secret = store.path_of(cert_key("a.example.com", "custom", "rsa"))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # No temporary files are left behind.
    assert [p.name for p in secret.parent.iterdir()] == ["a.example.com.pem"]


def test_watch_sees_puts_and_deletes(tmp_path):
    store = FileStore(tmp_path)

    async def run():
        stream = store.watch(1)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the generator's first step ran: the watch is armed (FileStore.watch)
        writer = FileStore(tmp_path)  # another process, as the CLI is
        await writer.put("apps/demo", b"{}")
        events = []
        batch = await asyncio.wait_for(first, 5)
        events += batch
        await writer.delete("apps/demo")
        while not any(e.kind is EventKind.DELETE for e in events):
            events += await asyncio.wait_for(stream.__anext__(), 5)
        await stream.aclose()
        return events

    events = asyncio.run(run())
    assert events[0].kind is EventKind.PUT and events[0].key == "apps/demo" and events[0].value == b"{}"
    assert events[-1].kind is EventKind.DELETE and events[-1].value is None
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)


def test_a_stamped_snapshot_reads_only_what_changed_since_the_stamps_it_is_given(tmp_path):
    """Catching up after a restart: files the local copy read already are not read again."""
    store = FileStore(tmp_path)

    async def snapshot(known):
        return {key: (value, stamp) async for key, value, stamp in store.snapshot_stamped(lambda keys: known)}

    async def run():
        for i in range(5):
            await store.put(f"domains/d{i}.example.com", b'{"app": "a"}')
        first = await snapshot({})
        assert all(value == b'{"app": "a"}' and stamp for value, stamp in first.values())
        stamps = {key: stamp for key, (_, stamp) in first.items()}
        await store.put("domains/d1.example.com", b'{"app": "b"}')  # replaced: a new file
        await store.delete("domains/d2.example.com")
        again = await snapshot(stamps)
        assert {key: value for key, (value, _) in again.items()} == {
            "domains/d0.example.com": None, "domains/d1.example.com": b'{"app": "b"}',
            "domains/d3.example.com": None, "domains/d4.example.com": None}

    asyncio.run(run())


def test_a_snapshot_of_a_vanished_store_is_an_error_not_an_empty_store(tmp_path):
    from edge.store.base import StoreError

    store = FileStore(tmp_path / "store")

    async def run():
        await store.put("apps/demo", b'{"backends": []}')
        (tmp_path / "store").rename(tmp_path / "away")
        try:
            [item async for item in store.snapshot()]
        except StoreError as exc:
            return str(exc)
        return None

    assert "missing" in (asyncio.run(run()) or "")
