"""TOML tables read with errors that name the file, line and key.

Generic (nothing of edge's settings): ``edge.config`` and ``edge.acme.settings``
read their sections through ``Table``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration error, with ``file:line:`` in front when known."""


class Source:
    """Finds the line of a key in the TOML text, for error messages."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None = None) -> int | None:
        header = re.compile(r"^\s*\[\s*" + re.escape(table) + r"\s*\]")
        any_header = re.compile(r"^\s*\[")
        key_re = re.compile(r"^\s*" + re.escape(key) + r"\s*=") if key else None
        inside = False
        for number, line in enumerate(self.lines, 1):
            if header.match(line):
                inside = True
                if key_re is None:
                    return number
                continue
            if any_header.match(line):
                inside = False
                continue
            if inside and key_re is not None and key_re.match(line):
                return number
        return None

    def error(self, table: str, key: str | None, message: str) -> ConfigError:
        line = self.line_of(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        name = f"[{table}] {key}" if key else f"[{table}]"
        return ConfigError(f"{where}: {name}: {message}")


def join(base: Path, path: Path) -> Path:
    # normpath, not resolve(): "../var" reads better than a symlink-resolved path.
    return Path(os.path.normpath(base / path))


class Table:
    def __init__(self, src: Source, name: str, data: dict[str, Any]) -> None:
        self.src, self.name, self.data = src, name, data
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"expected {expected}, got {type(value).__name__} {value!r}")
        return value

    def fail(self, key: str | None, message: str) -> ConfigError:
        return self.src.error(self.name, key, message)

    def path(self, key: str, default: Path | None, base: Path) -> Path | None:
        value = self.get(key, str, None)
        if value is None:
            return default if default is None or default.is_absolute() else join(base, default)
        if not value:
            return None
        return join(base, Path(value))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(unknown[0], "unknown key; check the spelling against config/edge.toml")
