"""Per-app settings kept in the app record beside its backends (issue #14).

``apps/<app>`` holds, besides ``backends`` and ``force_https``::

    "hsts": {"max_age": 31536000, "include_subdomains": true, "preload": false}   (absent: none)
    "maintenance": true                                                            (absent: false)
    "error_pages": {"503": "<html>...</html>"}                                     (absent: none)

They travel with the record, so they reach every node as a backend change
does (the store follower, within 100 ms). What the data path needs is
prepared here once per record change: the Strict-Transport-Security field
value, error pages as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ERROR_PAGE_STATUSES = (502, 503, 504)
MAX_ERROR_PAGE = 64 * 1024
HSTS_PRELOAD_MIN_AGE = 31536000  # hstspreload.org: a year at least, with includeSubDomains and preload


@dataclass(frozen=True, slots=True)
class Hsts:
    """RFC 6797 §6.1: max-age (§6.1.1), includeSubDomains (§6.1.2); preload is
    the browsers' list's token (hstspreload.org), not in the RFC."""

    max_age: int
    include_subdomains: bool = False
    preload: bool = False

    def field_value(self) -> bytes:
        value = b"max-age=%d" % self.max_age
        if self.include_subdomains:
            value += b"; includeSubDomains"
        if self.preload:
            value += b"; preload"
        return value

    def record(self) -> dict[str, Any]:
        return {"max_age": self.max_age, "include_subdomains": self.include_subdomains, "preload": self.preload}

    def warnings(self) -> list[str]:
        if self.preload and (self.max_age < HSTS_PRELOAD_MIN_AGE or not self.include_subdomains):
            return [f"--hsts-preload: browsers' preload lists want --hsts {HSTS_PRELOAD_MIN_AGE} (a year) or "
                    "more and --hsts-subdomains; the header is sent as asked"]
        return []


def parse_hsts(raw: Any) -> Hsts | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("max_age"), int) or raw["max_age"] < 0:
        raise ValueError(f"'hsts' is not {{\"max_age\": N >= 0, ...}}: {raw!r}")
    return Hsts(raw["max_age"], bool(raw.get("include_subdomains")), bool(raw.get("preload")))


def parse_error_pages(raw: Any) -> tuple[tuple[int, bytes], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ValueError("'error_pages' is not an object")
    pages = []
    for status, html in raw.items():
        if not str(status).isdigit() or int(status) not in ERROR_PAGE_STATUSES or not isinstance(html, str):
            raise ValueError(f"'error_pages' entry {status!r} is not a 502, 503 or 504 page")
        pages.append((int(status), html.encode()))
    return tuple(sorted(pages))


def error_page_problem(data: bytes, label: str) -> str | None:
    """Why ``data`` cannot be an error page (None: it can): at most 64 KiB of UTF-8."""
    if len(data) > MAX_ERROR_PAGE:
        return f"{label} is {len(data)} bytes; an error page may hold {MAX_ERROR_PAGE} (64 KiB) at most"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"{label} is not UTF-8 (byte {exc.start}); save it as UTF-8"
    if not data.strip():
        return f"{label} is empty"
    return None
