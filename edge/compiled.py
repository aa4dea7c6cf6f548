"""Which modules run compiled (mypyc), and whether the compiled ones are current.

The request path's modules can be compiled to C extensions with mypyc
(``make compile``; ``scripts/compile.py``): the same source, 20-30% fewer
instructions per request. The extension files sit next to the sources, and
Python's import system prefers an extension to a ``.py`` of the same name. So
an edited source would silently lose to an older build; ``choose`` prevents
that. It runs once, when the ``edge`` package is imported, before any of these
modules is: it compares the sources with the digests the build recorded, and
when one differs, or when ``EDGE_PURE=1`` is set, every ``edge`` module is
imported from its source (``python3 -m edge`` works the same either way).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST = PACKAGE_DIR / "compiled.json"  # written by scripts/compile.py: module -> sha256 of its source

# What scripts/compile.py compiles: the modules every request and every
# connection runs through. mypyc compiles them as one group (one shared
# library), so classes of one may subclass those of another natively.
MODULES = (
    "edge.proxy.authority",
    "edge.proxy.deadline",
    "edge.proxy.decide",
    "edge.proxy.downstream",
    "edge.proxy.exchange",
    "edge.proxy.forwarding",
    "edge.proxy.h1",
    "edge.proxy.h2proto",
    "edge.proxy.h2stream",
    "edge.proxy.protocol",
    "edge.proxy.request",
    "edge.proxy.routing",
    "edge.proxy.upstream",
    "edge.h2.connection", "edge.h2.frames", "edge.h2.headers", "edge.h2.sender", "edge.h2.streams", "edge.h2.encoder",
    "edge.h2.events", "edge.h2.settings", "edge.h2.errors",
)

# Set by ``choose``: "compiled", or why the sources run ("EDGE_PURE=1 is set", ...).
state = "not compiled"


def source_of(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_files() -> list[Path]:
    """Every extension module in the package (edge has none but mypyc's)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [Path(d, f) for d, _, files in os.walk(PACKAGE_DIR) for f in files if f.endswith(suffixes)]


def _why_not_current(extensions: list[Path]) -> str | None:
    """None when the build matches the sources, else what differs."""
    try:
        recorded = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return f"{MANIFEST.name} is missing or unreadable"
    present = {".".join((*p.relative_to(PACKAGE_DIR.parent).parts[:-1], p.name.split(".")[0])): p for p in extensions}
    for module, recorded_digest in recorded.items():
        try:
            current = digest(source_of(module))
        except OSError:
            return f"{source_of(module)} is unreadable"
        if recorded_digest != current:
            return f"{source_of(module).relative_to(PACKAGE_DIR.parent)} changed since it was compiled"
        if module not in present:  # half a build would run two copies of its classes
            return f"the compiled {module} is missing"
    for module, path in present.items():  # one left by an earlier build of other modules
        if module not in recorded and not module.endswith("__mypyc"):
            return f"{path.relative_to(PACKAGE_DIR.parent)} is not part of the build"
    return None


class SourceOnly(importlib.abc.MetaPathFinder):
    """Finds ``edge`` modules as sources (or packages), never as extensions."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("edge.") or path is None:
            return None
        loaders = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)
        for entry in path:  # the parent package's __path__
            spec = importlib.machinery.FileFinder(entry, loaders).find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


def choose() -> None:
    """Run the sources unless the compiled build is present and current."""
    global state
    extensions = extension_files()
    if not extensions:
        return
    if os.environ.get("EDGE_PURE") == "1":
        state = "running the Python sources: EDGE_PURE=1 is set"
    elif (reason := _why_not_current(extensions)) is not None:
        state = f"running the Python sources: {reason} (`make compile` rebuilds)"
    else:
        state = "compiled"
        return
    if not any(isinstance(finder, SourceOnly) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceOnly())


def loaded() -> list[str]:
    """The modules of ``MODULES`` imported from an extension in this process."""
    return [m for m in MODULES if getattr(sys.modules.get(m), "__file__", "").endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES))]
