"""The shared index (the local copy every process serves from) selects exactly as a whole store read into memory."""

from __future__ import annotations

import json
import random
from pathlib import Path

from edge.records import CertMeta, encode_bundle
from edge.store.base import Event, EventKind, app_key, cert_key, domain_key
from edge.store.copywriter import CopyWriter
from edge.store.follower import StoreFollower
from edge.store.index import Index
from edge.store.localcopy import LocalCopy
from edge.store.shared import SharedIndex
from edge.tls.selector import Selector

PEM = b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\ny\n"
NOW = 1_000_000.0


def _bundle(domain: str, source: str, key_type: str, rng: random.Random) -> bytes:
    not_after = rng.choice([NOW - 1, 2e9])
    return encode_bundle(CertMeta(domain, source, key_type, 0.0, not_after, f"fp{rng.random()}"), PEM)


def _events(rng: random.Random, count: int) -> list[Event]:
    out = [Event(EventKind.PUT, app_key("a"), json.dumps({"backends": ["127.0.0.1:1"]}).encode(), 1)]
    domains = [f"n{i}.example.com" for i in range(count)] + ["*.example.com", "*.n1.example.com"]
    for revision, domain in enumerate(domains, start=2):
        if rng.random() < 0.9:
            out.append(Event(EventKind.PUT, domain_key(domain), json.dumps({"app": "a"}).encode(), revision))
        for source, key_type in (("custom", "ecdsa"), ("acme", "ecdsa"), ("custom", "rsa")):
            if rng.random() < 0.5:
                out.append(Event(EventKind.PUT, cert_key(domain, source, key_type),
                                 _bundle(domain, source, key_type, rng), revision))
    for event in rng.sample(out[1:], count // 5):  # some removed again
        out.append(Event(EventKind.DELETE, event.key, None, 10_000))
    return out


def test_shared_index_selects_and_routes_as_the_in_memory_one(tmp_path: Path) -> None:
    rng = random.Random(3)
    copy = LocalCopy(tmp_path / "index", "file:/s", rebuild=True)
    writer = CopyWriter(copy)
    index = Index()
    follower = StoreFollower(store=None, copy=copy, writer=writer)  # type: ignore[arg-type]
    events = _events(rng, 300)
    for start in range(0, len(events), 37):  # batches, as the watch delivers them
        follower._apply(events[start : start + 37])
    for event in events:
        index.apply(event)
    writer.flush()
    shared = SharedIndex(copy)
    mine, theirs = Selector(index, "apps.test", False), Selector(shared, "apps.test", False)  # type: ignore[arg-type]
    names = [f"n{i}.example.com" for i in range(300)] + ["x.example.com", "a.n1.example.com", "nope.test"]
    for name in names:
        assert mine.select(name, NOW) == theirs.select(name, NOW), name
        assert index.app_of(name) == shared.app_of(name), name
    assert len(shared.apps) == 1


def test_full_loads_write_every_name_record_and_remove_what_is_gone(tmp_path: Path) -> None:
    rng = random.Random(4)
    copy = LocalCopy(tmp_path / "index", "file:/s", rebuild=True)
    writer = CopyWriter(copy)
    events = _events(rng, 200)
    for round_number in range(2):  # the first start, then a reload of a store that lost some entries
        index = Index()
        kept = events if round_number == 0 else [e for e in events if rng.random() < 0.7]
        writer.begin_full(first=round_number == 0)
        for event in kept:
            index.apply(event)
            writer.load([(event.key, event.value if event.kind is EventKind.PUT else None)])
        writer.end_full(1)
        writer.flush()
        shared = SharedIndex(copy)
        mine, theirs = Selector(index, "apps.test", False), Selector(shared, "apps.test", False)  # type: ignore[arg-type]
        for i in range(200):
            assert mine.select(f"n{i}.example.com", NOW) == theirs.select(f"n{i}.example.com", NOW)
            assert index.app_of(f"n{i}.example.com") == shared.app_of(f"n{i}.example.com")
        assert sorted(shared.domains) == sorted(index.domains)
    writer.close()


def test_a_handshake_reads_its_name_once_and_decodes_it_only_when_it_changed(tmp_path: Path, monkeypatch) -> None:
    """Every process selects from the copy (workers > 1 included): one lookup
    per handshake for a name that has its own certificate, and the stored
    record decoded again only when its bytes changed."""
    import edge.store.shared as shared_module

    def bundle(fingerprint: str) -> Event:
        meta = CertMeta("n.example.com", "custom", "ecdsa", 0.0, 2e9, fingerprint)
        return Event(EventKind.PUT, cert_key("n.example.com", "custom", "ecdsa"), encode_bundle(meta, PEM), 1)

    copy = LocalCopy(tmp_path / "index", "file:/s", rebuild=True)
    writer = CopyWriter(copy)
    follower = StoreFollower(store=None, copy=copy, writer=writer)  # type: ignore[arg-type]
    follower._apply([Event(EventKind.PUT, domain_key("n.example.com"), json.dumps({"app": "a"}).encode(), 1),
                     bundle("one")])
    writer.flush()
    shared = SharedIndex(copy)
    lookups, decodes = [], []
    real_name, real_decode = copy.name, shared_module.decode_name_record
    monkeypatch.setattr(copy, "name", lambda name: lookups.append(name) or real_name(name))
    monkeypatch.setattr(shared_module, "decode_name_record",
                        lambda name, raw: decodes.append(name) or real_decode(name, raw))
    selector = Selector(shared, "apps.test", False)  # type: ignore[arg-type]
    first = selector.select("n.example.com", NOW)
    for _ in range(5):
        assert selector.select("n.example.com", NOW) == first
    assert lookups == ["n.example.com"] * 6 and decodes == ["n.example.com"]
    follower._apply([bundle("two")])
    writer.flush()
    assert selector.select("n.example.com", NOW).cache_key != first.cache_key  # the change is seen at once
    assert len(lookups) == 7 and decodes == ["n.example.com"] * 2  # changed bytes: decoded once more
    writer.close()
