"""Compile edge's request path with mypyc, in place, and record what was compiled.

    python scripts/compile.py              compile edge.compiled.MODULES (needs mypy, a C compiler, Python.h)
    python scripts/compile.py --optional   the same, but a failure only warns: edge runs its sources
    python scripts/compile.py --remove     delete the compiled files: edge runs its sources

`make compile` runs the first; `make serve` and `make test` the second, so a
machine without a C compiler still serves. The extensions are written next to
the sources (``edge/proxy/h1.cpython-311-x86_64-linux-gnu.so`` beside ``h1.py``)
with one shared library, ``edge/request_path__mypyc...so``; the digests of the
sources go to ``edge/compiled.json``, which ``edge.compiled`` checks at import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["EDGE_PURE"] = "1"  # this process reads the sources; it must not load a build it is replacing

from edge import compiled  # noqa: E402

GROUP = "edge.request_path"  # the shared library: edge/request_path__mypyc.*.so


def built_files() -> list[Path]:
    """Every extension in the package (those of an earlier build of other modules
    too: a leftover would be imported in place of its source) and the manifest."""
    manifest = [compiled.MANIFEST] if compiled.MANIFEST.exists() else []
    return compiled.extension_files() + manifest


def remove() -> None:
    for path in built_files():
        path.unlink()


def build() -> None:
    from mypyc.build import mypycify  # the compile extra: pip install -e '.[compile]'
    from setuptools import setup

    sources = [str(compiled.source_of(m).relative_to(ROOT)) for m in compiled.MODULES]
    digests = {m: compiled.digest(compiled.source_of(m)) for m in compiled.MODULES}
    os.chdir(ROOT)
    setup(
        name="edge-request-path",
        ext_modules=mypycify(sources, opt_level="3", group_name=GROUP, target_dir="build/mypyc"),
        script_args=["--quiet", "build_ext", "--inplace", "--build-temp", "build/mypyc/temp"],
    )
    # Last: a manifest exists only for a complete build.
    compiled.MANIFEST.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optional", action="store_true", help="on failure, warn and leave the sources to run")
    parser.add_argument("--remove", action="store_true", help="delete the compiled files")
    args = parser.parse_args()
    remove()  # never leave a build of other sources behind, whatever happens next
    if args.remove:
        print("compile: removed; edge runs its Python sources")
        return 0
    try:
        build()
    except (Exception, SystemExit) as exc:  # setup() reports a compiler failure as SystemExit
        remove()
        message = f"compile: mypyc failed ({exc or type(exc).__name__}); edge runs its Python sources"
        if not args.optional:
            print(message, file=sys.stderr)
            return 1
        print(f"{message}. For the compiled request path: install gcc and python3-dev, then `make compile`.",
              file=sys.stderr)
        return 0
    print(f"compile: {len(compiled.MODULES)} modules compiled with mypyc ({compiled.MANIFEST.name} written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
