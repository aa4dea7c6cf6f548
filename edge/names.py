"""Host name rules shared by certificate selection, uploads and routing.

A name is kept in one canonical form everywhere (index keys, store keys, the
SNI step, the Host header): lower case, no trailing dot, IDNA A-labels. That
way every lookup is a plain dict access on an exact string.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import idna

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

# RFC 1123 §2.1 host name labels (letters, digits, hyphen; not starting or
# ending with a hyphen), at most 63 octets each (RFC 1035 §2.3.4).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_MAX_NAME = 253  # RFC 1035 §2.3.4: 255 octets on the wire = 253 characters


def _valid_ascii(name: str) -> bool:
    if not name or len(name) > _MAX_NAME:
        return False
    labels = name.split(".")
    if len(labels) < 2:
        # A single label ("localhost", "intranet") is no public name; SNI
        # (RFC 6066 §3) carries fully qualified names only.
        return False
    if labels[-1].isdigit():
        # An IPv4 literal ("127.0.0.1"), which RFC 6066 §3 forbids in SNI; no
        # top-level domain is all digits (RFC 3696 §2).
        return False
    return all(_LABEL.match(label) for label in labels)


@lru_cache(maxsize=65536)
def normalize(raw: str | bytes | None) -> str | None:
    """Return the canonical form of ``raw``, or None when it is no valid host name.

    Lower case, trailing dot removed, IDNA A-labels (RFC 5890, with UTS #46
    mapping as browsers do). The cache keeps the SNI step to one dict hit for
    names seen before.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            # RFC 6066 §3: HostName is ASCII; UTF-8 here is a broken client,
            # but decoding it is kinder than refusing.
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
    else:
        text = raw
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    return name if _valid_ascii(name) else None


def normalize_pattern(raw: str) -> str | None:
    """Normalise a domain that may be a wildcard (``*.example.com``).

    The wildcard must be the whole left-most label and cover at least two
    labels, as CA/Browser Forum rules and RFC 6125 §6.4.3 allow.
    """
    raw = raw.strip()
    if raw.startswith("*."):
        rest = normalize(raw[2:])
        return f"*.{rest}" if rest else None
    return normalize(raw)


def is_wildcard(pattern: str) -> bool:
    return pattern.startswith("*.")


def wildcard_parent(name: str) -> str | None:
    """The wildcard domain one label up: ``a.example.com`` -> ``*.example.com``.

    Only one level: ``*.example.com`` never covers ``a.b.example.com`` nor
    ``example.com`` (RFC 6125 §6.4.3).
    """
    dot = name.find(".")
    if dot < 0 or name.count(".", dot + 1) == 0:
        return None  # "example.com" has no wildcard above it that we honour
    return "*" + name[dot:]


def covers(pattern: str, name: str) -> bool:
    """Does certificate name ``pattern`` (maybe a wildcard) cover host ``name``?"""
    if pattern == name:
        return True
    return is_wildcard(pattern) and wildcard_parent(name) == pattern


@lru_cache(maxsize=1)
def _public_suffixes() -> PublicSuffixList:
    # Loaded on first use (~30 ms): the SNI path never needs it.
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def public_suffix_problem(pattern: str) -> str | None:
    """Why ``pattern`` (canonical, maybe a wildcard) cannot be a customer's domain, or None.

    A public suffix (``co.uk``, ``github.io``: the Public Suffix List, private
    section included) is shared by unrelated owners: attaching it, or the
    wildcard right under it (``*.co.uk``), would let one app claim names that
    belong to everyone registering under that suffix.
    """
    bare = pattern[2:] if is_wildcard(pattern) else pattern
    if _public_suffixes().is_public(bare):
        if is_wildcard(pattern):
            return (f"{pattern} is a wildcard of the public suffix {bare} (Public Suffix List): it would "
                    f"cover every domain registered under {bare}; attach your own domain, e.g. "
                    f"*.example.{bare}")
        return (f"{pattern} is a public suffix (Public Suffix List), under which anyone registers domains; "
                f"attach a domain registered under it, e.g. example.{bare}")
    return None


def is_under(name: str, domain: str) -> bool:
    """``name`` is ``domain`` itself or any name below it."""
    return name == domain or name.endswith("." + domain)


def is_one_label_under(name: str, domain: str) -> bool:
    """``app.domain`` style: exactly one label in front of ``domain``."""
    if not name.endswith("." + domain):
        return False
    head = name[: -len(domain) - 1]
    return bool(head) and "." not in head
