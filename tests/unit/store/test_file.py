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
