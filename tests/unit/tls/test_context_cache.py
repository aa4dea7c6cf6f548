"""ContextCache: a bounded LRU, and one build for concurrent misses on a key."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from edge.config import Config, TlsConfig
from edge.tls.contexts import ContextCache


class _Loader:
    """Builds a fresh context per call and counts calls; ``gate`` holds builds back."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, key: tuple[str, ...]) -> ssl.SSLContext:
        self.calls.append(key)
        await self.gate.wait()
        if key == ("broken",):
            raise ValueError("refused")
        return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def test_least_recently_used_goes_first() -> None:
    async def run() -> None:
        loader = _Loader()
        cache = ContextCache(2, loader)
        a, b = await cache.get(("a",)), await cache.get(("b",))
        assert cache.get_nowait(("a",)) is a  # a is now the most recent
        await cache.get(("c",))
        assert len(cache) == 2
        assert cache.get_nowait(("b",)) is None and cache.get_nowait(("a",)) is a
        assert await cache.get(("b",)) is not b  # rebuilt
        assert (cache.hits, cache.misses) == (2, 4)

    asyncio.run(run())


def test_concurrent_misses_share_one_build() -> None:
    async def run() -> None:
        loader = _Loader()
        loader.gate.clear()
        cache = ContextCache(10, loader)
        waiting = [asyncio.ensure_future(cache.get(("x",))) for _ in range(5)]
        await asyncio.sleep(0)  # every get reaches the build or waits on it
        loader.gate.set()
        built = await asyncio.gather(*waiting)
        assert loader.calls == [("x",)] and all(ctx is built[0] for ctx in built)
        assert cache.misses == 1

    asyncio.run(run())


def test_a_failed_build_fails_every_waiter_and_is_not_cached() -> None:
    async def run() -> None:
        loader = _Loader()
        loader.gate.clear()
        cache = ContextCache(10, loader)
        waiting = [asyncio.ensure_future(cache.get(("broken",))) for _ in range(3)]
        await asyncio.sleep(0)
        loader.gate.set()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results) and len(loader.calls) == 1
        with pytest.raises(ValueError):
            await cache.get(("broken",))  # tried again, not remembered
        assert len(loader.calls) == 2 and len(cache) == 0

    asyncio.run(run())


def test_reconfigure_resizes_and_drops_contexts_of_another_tls_version() -> None:
    async def run() -> None:
        cache = ContextCache(10, _Loader())
        await cache.get(("a",))
        cache.reconfigure(Config(tls=TlsConfig(context_cache_size=5)))
        assert cache.size == 5 and len(cache) == 1  # same minimum version: kept
        cache.reconfigure(Config(tls=TlsConfig(min_version="TLSv1.3", context_cache_size=5)))
        assert len(cache) == 0 and cache.min_version == "TLSv1.3"

    asyncio.run(run())
