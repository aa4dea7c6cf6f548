"""ContextLoader: a cache key names record values (BundleKey), and a version the
watch delivered builds without asking the store."""

from __future__ import annotations

import asyncio
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge.records import CertMeta, encode_bundle, entry_digest
from edge.store.base import StoreError, cert_key
from edge.tls.contexts import ContextBuildError
from edge.tls.devcert import ensure_dev_certificates
from edge.tls.loader import ContextLoader
from edge.tls.selector import BundleKey


class _Unreachable:
    """A store that is down: every read fails, and is counted."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    async def get(self, key: str) -> bytes | None:
        self.reads.append(key)
        raise StoreError("store unreachable")


def _bundle(tmp_path: Path) -> bytes:
    cert, key = tmp_path / "x.crt", tmp_path / "x.key"
    ensure_dev_certificates("example.com", cert, key)
    meta = CertMeta("www.example.com", "custom", "ecdsa", 0.0, 2e9, "fp")
    return encode_bundle(meta, cert.read_bytes() + key.read_bytes())


def test_key_of_record_values_builds_the_kept_version_without_the_store(tmp_path: Path) -> None:
    value = _bundle(tmp_path)
    store = _Unreachable()
    store_key = cert_key("www.example.com", "custom", "ecdsa")

    async def run() -> None:
        with ThreadPoolExecutor(1) as executor:
            loader = ContextLoader(store, executor, lambda: "TLSv1.2", keep=4)  # type: ignore[arg-type]
            loader.remember(store_key, value)
            bundle = BundleKey("www.example.com", "custom", "ecdsa", entry_digest(value))
            assert bundle.store_key == store_key
            assert isinstance(await loader.load((bundle,)), ssl.SSLContext)
            assert store.reads == []
            # Another digest is another version: not the kept one, so the store is asked.
            with pytest.raises(ContextBuildError):
                await loader.load((bundle._replace(digest=bundle.digest ^ 1),))
            assert store.reads == [store_key]

    asyncio.run(run())
