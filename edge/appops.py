"""Management of per-app settings (HSTS, maintenance, error pages): what
``edge apps-add`` flags and ``edge apps-error-page`` do to the app record.

A mixin of ``Operations``: validation first, one write under the store's
write lock, settings not named by a command kept as they were.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from edge import records
from edge.appsettings import ERROR_PAGE_STATUSES, Hsts, error_page_problem
from edge.store import base

if TYPE_CHECKING:
    from edge.operations import Operations, Result


def merged_record(old: bytes | None, record: dict[str, Any], hsts: Hsts | bool | None,
                  maintenance: bool | None) -> dict[str, Any]:
    """``record`` (backends, force_https) with the settings of the stored one
    kept, except those given: ``hsts`` None keeps, False drops, an ``Hsts``
    sets; ``maintenance`` None keeps."""
    previous: dict[str, Any] = {}
    if old is not None:
        try:
            loaded = json.loads(old)
            previous = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            previous = {}  # a damaged record is replaced whole
    for key in ("hsts", "maintenance", "error_pages"):
        if previous.get(key) is not None:
            record[key] = previous[key]
    if isinstance(hsts, Hsts):
        record["hsts"] = hsts.record()
    elif hsts is False:
        record.pop("hsts", None)
    if maintenance is not None:
        if maintenance:
            record["maintenance"] = True
        else:
            record.pop("maintenance", None)
    return record


class AppSettingsOps:
    async def apps_error_page(self: Operations, name: str, status: int, html: bytes | None,
                              label: str = "the page") -> Result:
        """Set (``html``) or remove (None) the page replacing the body of the
        ``status`` answers edge makes for app ``name``."""
        from edge.operations import NotFoundError, OperationError, Result

        if status not in ERROR_PAGE_STATUSES:
            raise OperationError(f"--status {status}: error pages are for 502, 503 and 504")
        if html is not None:
            problem = error_page_problem(html, label)
            if problem is not None:
                raise OperationError(problem)
        key = base.app_key(name)
        async with self.store.write_lock():
            value = await self.store.get(key)
            if value is None:
                raise NotFoundError(f"no app named {name!r}; `edge apps` lists them")
            try:
                record = json.loads(value)
                pages = dict(record.get("error_pages") or {})
            except (ValueError, AttributeError, TypeError):
                raise OperationError(f"the stored record of app {name} is damaged; `edge apps-add` rewrites it") \
                    from None
            if html is None:
                if pages.pop(str(status), None) is None:
                    return Result(f"app {name} had no {status} page")
            else:
                pages[str(status)] = html.decode()
            if pages:
                record["error_pages"] = pages
            else:
                record.pop("error_pages", None)
            backends, force_https = record.pop("backends", []), bool(record.pop("force_https", True))
            await self.store.put(key, records.encode_app(backends, force_https, record))
        if html is None:
            return Result(f"app {name}: the {status} page removed (edge's own page is served)")
        return Result(f"app {name}: {len(html)} bytes served as the body of its {status} answers")
