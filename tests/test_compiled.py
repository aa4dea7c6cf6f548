"""The compiled request path (scripts/compile.py, mypyc): used when current,
never when older than its sources, never under EDGE_PURE=1."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge import compiled

ROOT = Path(__file__).parents[1]
_SHOW = "import edge.compiled as c, edge.proxy.h1 as h1; print(h1.__file__); print(c.state)"


def _import_in(package_root: Path, **env: str) -> tuple[str, str]:
    """(file edge.proxy.h1 came from, edge.compiled.state) in a fresh interpreter
    that finds ``edge`` under ``package_root`` first."""
    environ = {k: v for k, v in os.environ.items() if k != "EDGE_PURE"}
    environ.update(env, PYTHONPATH=str(package_root))
    out = subprocess.run([sys.executable, "-c", _SHOW], cwd=package_root, env=environ,
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    return out[0], out[1]


@pytest.fixture
def copied_package(tmp_path: Path) -> Path:
    """A copy of the ``edge`` package with a build of its own: an extension file for
    ``edge.proxy.h1`` that is not loadable (importing it would fail), and a manifest
    saying it matches the sources. What runs is then decided by the check alone."""
    shutil.copytree(ROOT / "edge", tmp_path / "edge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "compiled.json"))
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (tmp_path / "edge" / "proxy" / f"h1{suffix}").write_bytes(b"not an extension")
    _write_manifest(tmp_path, ["edge.proxy.h1"])
    return tmp_path


def _write_manifest(package_root: Path, modules: list[str]) -> None:
    manifest = {m: compiled.digest(package_root.joinpath(*m.split(".")).with_suffix(".py")) for m in modules}
    (package_root / "edge" / "compiled.json").write_text(json.dumps(manifest))


def test_a_current_build_is_imported(copied_package: Path) -> None:
    # The unloadable extension is tried: proof that a current build is used.
    with pytest.raises(subprocess.CalledProcessError) as failed:
        _import_in(copied_package)
    assert "h1" in failed.value.stderr and "ImportError" in failed.value.stderr


def test_a_source_edited_after_the_build_runs_instead_of_it(copied_package: Path) -> None:
    source = copied_package / "edge" / "proxy" / "h1.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    origin, state = _import_in(copied_package)
    assert origin == str(source)
    assert state.startswith("running the Python sources: edge/proxy/h1.py changed since it was compiled")


def test_a_build_without_its_manifest_is_not_used(copied_package: Path) -> None:
    (copied_package / "edge" / "compiled.json").unlink()
    origin, state = _import_in(copied_package)
    assert origin.endswith("h1.py") and "compiled.json is missing" in state


def test_an_extension_left_by_another_build_is_not_used(copied_package: Path) -> None:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (copied_package / "edge" / f"names{suffix}").write_bytes(b"not an extension")
    origin, state = _import_in(copied_package)
    assert origin.endswith("h1.py") and f"edge/names{suffix} is not part of the build" in state


def test_half_a_build_is_not_used(copied_package: Path) -> None:
    _write_manifest(copied_package, ["edge.proxy.h1", "edge.proxy.request"])  # request's extension is gone
    origin, state = _import_in(copied_package)
    assert origin.endswith("h1.py") and "the compiled edge.proxy.request is missing" in state


def test_edge_pure_runs_the_sources(copied_package: Path) -> None:
    origin, state = _import_in(copied_package, EDGE_PURE="1")
    assert origin.endswith("h1.py") and state == "running the Python sources: EDGE_PURE=1 is set"


def test_no_build_is_not_an_error(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "edge", tmp_path / "edge", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    origin, state = _import_in(tmp_path)
    assert origin.endswith("h1.py") and state == "not compiled"


def test_the_suite_runs_on_the_build_it_expects() -> None:
    """This process (and every edge it starts) imports the compiled modules exactly
    when the build is current; EDGE_EXPECT_COMPILED=1 (CI; `make test` after a
    build) requires that it is."""
    import edge.proxy.protocol  # noqa: F401  (and the compiled modules it imports)

    if os.environ.get("EDGE_PURE") == "1":
        assert compiled.state == "running the Python sources: EDGE_PURE=1 is set"
    elif os.environ.get("EDGE_EXPECT_COMPILED") == "1":
        assert compiled.state == "compiled", "run `make compile`: it says why it cannot build"
    if compiled.state == "compiled":
        assert set(compiled.loaded()) >= {"edge.proxy.protocol", "edge.proxy.h1", "edge.proxy.request"}
    else:
        assert compiled.loaded() == []
