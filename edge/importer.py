"""``edge certs-import``: bulk import of PEM bundles as custom certificates.

Takes what HAProxy setups hold: files with the chain and the key in one PEM,
directories of them (``crt /etc/haproxy/certs/``), and crt-lists (one bundle
path per line, optional SSL options and SNI filters after it). Each bundle is
validated like an upload and stored for every DNS name it covers; a bad file
is reported and skipped, the rest imported.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge import records
from edge.operations import OperationError, Operations
from edge.records import CertMeta, CertSource, EntryError, parse_domain
from edge.store import base
from edge.tls import bundle as bundles

_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----\r?\n?", re.S)
# HAProxy loads every file of a crt directory but these companions.
_SKIPPED_SUFFIXES = (".key", ".ocsp", ".issuer", ".sctl", ".txt")
_BATCH = 500


EXIT_SKIPPED = 3  # `edge certs-import`: some files or names skipped, the rest imported


@dataclass
class ImportReport:
    files: int = 0
    imported_names: int = 0
    skipped_files: list[str] = field(default_factory=list)
    skipped_names: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: all imported; 3: something skipped (a script must notice); 1: files given, none imported."""
        if self.files and len(self.skipped_files) == self.files:
            return 1
        return EXIT_SKIPPED if self.skipped_files or self.skipped_names else 0


def split_pem(data: bytes) -> tuple[bytes, bytes]:
    """(certificate blocks, private key block) of one combined PEM file."""
    certs, keys = [], []
    for match in _BLOCK.finditer(data):
        label = match.group(1)
        block = match.group(0) if match.group(0).endswith(b"\n") else match.group(0) + b"\n"
        if label == b"CERTIFICATE":
            certs.append(block)
        elif label.endswith(b"PRIVATE KEY"):
            keys.append(block)
    return b"".join(certs), b"".join(keys)


def _crt_list_paths(path: Path) -> Iterator[Path]:
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        target = Path(line.split()[0])
        yield target if target.is_absolute() else path.parent / target


def bundle_paths(paths: list[str]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file() and not child.name.startswith(".") and not child.name.endswith(_SKIPPED_SUFFIXES):
                    yield child
        elif path.is_file() and b"-----BEGIN" not in path.read_bytes()[:65536]:
            yield from _crt_list_paths(path)  # a crt-list
        else:
            yield path


async def _known_owners(ops: Operations) -> dict[str, str | None]:
    """Every domain's app, read once without the lock: a hint that spares most
    names a refusal later; the batch writes re-read their names under it."""
    owners: dict[str, str | None] = {}
    for key, value in (await ops.store.items(base.DOMAINS)).items():
        try:
            owners[key[len(base.DOMAINS):]] = parse_domain(value)
        except EntryError:
            owners[key[len(base.DOMAINS):]] = None  # damaged: re-read (and refused) at write time
    return owners


async def _write_batch(ops: Operations, app: str, pending: list[tuple[str, bytes]],
                       owners: dict[str, str | None], report: ImportReport) -> None:
    """Store (domain, bundle) pairs under the store's write lock, after checking
    again that the app exists and who owns each domain: another command may
    have changed either since the files were read."""
    async with ops.store.write_lock():
        if await ops.store.get(base.app_key(app)) is None:
            raise OperationError(f"app {app!r} was removed during the import; "
                                 f"{report.imported_names} names were imported before")
        stored = await ops.store.get_many([base.domain_key(domain) for domain, _ in pending])
        items: list[tuple[str, bytes, bool]] = []
        attach: list[tuple[str, bytes, bool]] = []
        attached: set[str] = set()
        for domain, value in pending:
            raw = stored.get(base.domain_key(domain))
            try:
                owner = parse_domain(raw) if raw is not None else None
            except EntryError as exc:
                report.skipped_names.append(f"{domain}: its stored domain entry is damaged ({exc})")
                continue
            if owner is not None and owner != app:
                owners[domain] = owner
                report.skipped_names.append(f"{domain}: attached to app {owner}")
                continue
            if owner is None and domain not in attached:
                attach.append((base.domain_key(domain), records.encode_domain(app), False))
                attached.add(domain)
                owners[domain] = app
            items.append((base.cert_key(domain, CertSource.CUSTOM, _key_type(value)), value, True))
            report.imported_names += 1
        # Certificates before their domains, as domains-add does: the ACME
        # manager never sees a new domain without its certificate, and an import
        # killed midway leaves unattached certificates, which are not served.
        await ops.store.put_many(items + attach)


def _key_type(value: bytes) -> str:
    return str(json.loads(value.partition(b"\n")[0])["key_type"])


async def import_bundles(ops: Operations, app: str, paths: list[str], progress: bool = True) -> ImportReport:
    if await ops.store.get(base.app_key(app)) is None:
        raise OperationError(f"no app named {app!r}; add it first with `edge apps-add {app} --backend HOST:PORT`")
    owners = await _known_owners(ops)
    report = ImportReport()
    pending: list[tuple[str, bytes]] = []
    started = time.monotonic()
    all_paths = list(bundle_paths(paths))
    for number, path in enumerate(all_paths, 1):
        report.files += 1
        validated = _validated(path, report)
        if validated is not None:
            for name in validated.names:
                try:
                    domain = ops.domain_name(name)  # the same rules as domains-add
                except OperationError as exc:
                    report.skipped_names.append(f"{name} ({path}): {exc}")
                    continue
                owner = owners.get(domain)
                if owner is not None and owner != app:
                    report.skipped_names.append(f"{domain} ({path}): attached to app {owner}")
                    continue
                meta = CertMeta(domain, CertSource.CUSTOM, validated.key_type, validated.not_before,
                                validated.not_after, validated.fingerprint)
                pending.append((domain, records.encode_bundle(meta, validated.pem)))
        if len(pending) >= _BATCH:
            await _write_batch(ops, app, pending, owners, report)
            pending = []
        if progress and (number % 1000 == 0 or number == len(all_paths)):
            rate = number / max(time.monotonic() - started, 1e-9)
            print(f"\rimported {number}/{len(all_paths)} files ({rate:.0f}/s)", end="", file=sys.stderr, flush=True)
    if pending:
        await _write_batch(ops, app, pending, owners, report)
    if progress and all_paths:
        print(file=sys.stderr)
    return report


def _validated(path: Path, report: ImportReport) -> bundles.Bundle | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        report.skipped_files.append(f"{path}: {exc.strerror}")
        return None
    cert_pem, key_pem = split_pem(data)
    try:
        if not key_pem:
            raise bundles.BundleError(f"{path}: no private key in the file; HAProxy-style bundles hold "
                                      "the chain and the key together")
        return bundles.validate(cert_pem, key_pem, None, cert_path=str(path), key_path=str(path))
    except bundles.BundleError as exc:
        report.skipped_files.append(str(exc))
        return None
