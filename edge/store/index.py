"""A whole store read into memory: what the CLI (``edge check``) and the
management operations (listings, ``explain``) look at, once per command.

A serving process keeps no such index: it reads the host's local copy
(``edge.store.shared``), which the store follower keeps in step.

A small entry per name: apps, which app each domain belongs to, and for each
domain the *header* of each certificate bundle (source, key type, validity,
fingerprint); the records are decoded by ``edge.records``. Values that do
not parse (someone edited a file by hand) are reported in ``errors`` and
skipped.
"""

from __future__ import annotations

import logging
import sys

from edge.records import App, DomainCerts, EntryError, parse_app, parse_cert, parse_domain
from edge.store.base import APPS, CERTS, DOMAINS, Event, EventKind, parse_cert_key

log = logging.getLogger(__name__)

_EMPTY = DomainCerts()


class Index:
    """Apps, domains and certificate headers; the selector and router read
    the same attributes of the shared index."""

    def __init__(self) -> None:
        self.apps: dict[str, App] = {}
        self.domains: dict[str, str] = {}  # domain -> app
        self.certs: dict[str, DomainCerts] = {}
        self.revision = 0
        self.errors: dict[str, str] = {}  # store key -> why it was skipped
        self.changes = 0  # bumped by every applied change: lets readers cache derived views

    def apply_put(self, key: str, value: bytes) -> None:
        self.apply(Event(EventKind.PUT, key, value, 0))

    def corrupted(self, limit: int = 100) -> dict[str, str]:
        """Damaged store entries (key -> why), at most ``limit`` of them, in key order."""
        return dict(sorted(self.errors.items())[:limit])

    def apply(self, event: Event) -> None:
        self.changes += 1
        key = event.key
        if event.revision:
            self.revision = max(self.revision, event.revision)
        try:
            if key.startswith(APPS):
                self._apply_app(key[len(APPS) :], event)
            elif key.startswith(DOMAINS):
                self._apply_domain(key[len(DOMAINS) :], event)
            elif key.startswith(CERTS):
                self._apply_cert(key, event)
            else:
                return
        except EntryError as exc:
            self.errors[key] = str(exc)
            log.error("store entry %s skipped: %s; the previous version stays in service", key, exc)
            return
        self.errors.pop(key, None)

    def _apply_app(self, name: str, event: Event) -> None:
        if event.kind is EventKind.DELETE:
            self.apps.pop(name, None)
        else:
            assert event.value is not None
            self.apps[name] = parse_app(name, event.value)

    def _apply_domain(self, domain: str, event: Event) -> None:
        if event.kind is EventKind.DELETE:
            self.domains.pop(domain, None)
        else:
            assert event.value is not None
            self.domains[sys.intern(domain)] = parse_domain(event.value)

    def _apply_cert(self, key: str, event: Event) -> None:
        if event.kind is EventKind.DELETE:
            parts = parse_cert_key(key)
            if parts is None:
                return
            domain, source, key_type = parts
            held = self.certs.get(domain)
            if held is not None:
                rest = held.without(source, key_type)
                if rest:
                    self.certs[domain] = rest
                else:
                    del self.certs[domain]
        else:
            assert event.value is not None
            meta = parse_cert(key, event.value)
            self.certs[meta.domain] = self.certs.get(meta.domain, _EMPTY).replaced(meta)

    def app_of(self, host: str) -> App | None:
        app = self.domains.get(host)
        return self.apps.get(app) if app is not None else None
