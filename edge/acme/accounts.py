"""ACME account keys, one per CA, kept in the store (0600) so that every node of a fleet
uses the same account (RFC 8555 §7.3: newAccount is idempotent per key)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor

from edge.acme.client import AcmeError, new_account_key
from edge.store import base

log = logging.getLogger(__name__)

LOCK_TTL = 60  # seconds the account-creation lock lives


def account_key_name(directory: str, primary: str) -> str:
    """The store key of a CA's account key: ``acme/account`` for the primary (as ever),
    ``acme/account-<hash of the directory URL>`` for each other CA."""
    if directory == primary:
        return base.ACME_ACCOUNT
    return f"{base.ACME_ACCOUNT}-{hashlib.sha256(directory.encode()).hexdigest()[:16]}"


class Accounts:
    def __init__(self, store: base.Store, pool: ThreadPoolExecutor) -> None:
        self.store = store
        self._pool = pool
        self._keys: dict[str, bytes] = {}

    async def key(self, directory: str, primary: str) -> bytes:
        """The account key for one CA, created once (by one node, under a lock) and kept."""
        name = account_key_name(directory, primary)
        if name in self._keys:
            return self._keys[name]
        try:
            stored = await self.store.get(name)
            if stored is None:
                lock = await self.store.try_lock("acme-account", LOCK_TTL)
                if lock is None:
                    raise AcmeError("another node is creating the ACME account key", "failed", 5.0)
                try:
                    stored = await self.store.get(name)
                    if stored is None:
                        stored = await asyncio.get_running_loop().run_in_executor(self._pool, new_account_key)
                        if not await lock.put_if_held(name, stored, secret=True):
                            raise AcmeError("lost the lock while storing the ACME account key")
                        log.info("ACME: account key created and stored for %s", directory)
                finally:
                    await lock.release()
        except base.StoreError as exc:
            raise AcmeError(f"cannot read or write the ACME account key: {exc}", "failed") from None
        self._keys[name] = stored
        return stored
