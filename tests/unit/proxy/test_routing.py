"""The router's host -> app routes, kept per process between changes of the
local copy: every committed change is seen by the very next lookup."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.proxy import routing
from edge.proxy.routing import Router
from edge.store import localcopy
from edge.store.base import Event, EventKind, app_key, domain_key
from edge.store.copywriter import CopyWriter
from edge.store.follower import StoreFollower
from edge.store.localcopy import LocalCopy
from edge.store.shared import SharedIndex
from edge.tls.selector import Selector


def _app(name: str, *backends: str) -> Event:
    return Event(EventKind.PUT, app_key(name), json.dumps({"backends": list(backends)}).encode(), 1)


def _domain(name: str, app: str | None) -> Event:
    if app is None:
        return Event(EventKind.DELETE, domain_key(name), None, 1)
    return Event(EventKind.PUT, domain_key(name), json.dumps({"app": app}).encode(), 1)


class Copy:
    """A local copy, its writer, and a router reading it as a serving process does."""

    def __init__(self, path: Path, loaded: asyncio.Event | None = None) -> None:
        self.copy = LocalCopy(path, "file:/s", rebuild=True)
        self.writer = CopyWriter(self.copy)
        self.follower = StoreFollower(store=None, copy=self.copy, writer=self.writer)  # type: ignore[arg-type]
        index = SharedIndex(self.copy)
        self.router = Router(index, Selector(index, "apps.test", False), "apps.test", 4,  # type: ignore[arg-type]
                             loaded=loaded)

    def apply(self, *events: Event) -> None:
        self.follower._apply(list(events))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
def copy(tmp_path: Path) -> Iterator[Copy]:
    held = Copy(tmp_path / "index")
    yield held
    held.close()


def test_the_copys_version_is_lmdbs_last_commit(copy: Copy) -> None:
    seen = [copy.copy.version()]
    for n in range(5):
        copy.apply(_app(f"a{n}", "127.0.0.1:1"))
        assert copy.copy.version() == int(copy.copy.env.info()["last_txnid"])
        seen.append(copy.copy.version())
    assert seen == sorted(set(seen))  # every commit moves it


def test_a_changed_app_or_domain_is_routed_by_the_next_request(copy: Copy) -> None:
    router = copy.router
    copy.apply(_app("one", "127.0.0.1:1"), _app("two", "127.0.0.1:2"), _domain("www.custom.test", "one"))
    app = router.app_for("www.custom.test")
    assert app is not None and app.backends == ("127.0.0.1:1",)
    assert router.app_for("www.custom.test") is app  # kept: the copy did not change
    assert router.app_for("nope.test") is None

    copy.apply(_app("one", "127.0.0.1:9"))  # new backends: the next request uses them
    app = router.app_for("www.custom.test")
    assert app is not None and app.backends == ("127.0.0.1:9",)
    assert router.pool_for(app).backends[0].address == "127.0.0.1:9"

    copy.apply(_domain("www.custom.test", "two"))  # the domain moves to another app
    app = router.app_for("www.custom.test")
    assert app is not None and app.name == "two"

    copy.apply(_domain("nope.test", "two"))  # a name that had no app gets one
    assert router.app_for("nope.test") is not None

    copy.apply(_domain("www.custom.test", None))  # removed: nothing routes it any more
    assert router.app_for("www.custom.test") is None
    assert router.app_for("two.apps.test") is not None  # the app's own name under the platform domain


def test_the_routes_kept_are_bounded(copy: Copy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "ROUTES_KEPT", 10)
    copy.apply(_app("one", "127.0.0.1:1"))
    for n in range(100):
        assert copy.router.app_for(f"h{n}.test") is None
        assert len(copy.router._routes) <= 10
    assert copy.router.app_for("one.apps.test") is not None


def test_nothing_is_kept_while_the_first_load_is_under_way(tmp_path: Path) -> None:
    loaded = asyncio.Event()
    copy = Copy(tmp_path / "index", loaded)
    try:
        copy.apply(_app("one", "127.0.0.1:1"))
        assert copy.router.app_for("one.apps.test") is not None
        assert copy.router._routes == {}  # names read on demand stand in for a moment only
        loaded.set()
        assert copy.router.app_for("one.apps.test") is not None
        assert "one.apps.test" in copy.router._routes
    finally:
        copy.close()


def test_a_copy_whose_meta_pages_read_otherwise_asks_lmdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localcopy, "_META_MAGIC", 0)  # as if LMDB's layout were another
    copy = Copy(tmp_path / "index")
    try:
        assert copy.copy._ids is None
        before = copy.copy.version()
        copy.apply(_app("one", "127.0.0.1:1"), _domain("www.custom.test", "one"))
        assert copy.copy.version() == int(copy.copy.env.info()["last_txnid"]) > before
        assert copy.router.app_for("www.custom.test") is not None
        copy.apply(_domain("www.custom.test", None))
        assert copy.router.app_for("www.custom.test") is None  # still seen at once
    finally:
        copy.close()
