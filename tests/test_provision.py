"""`make test` on a bare machine: scripts/provision.sh installs the programs
the tests run, or stops with the exact command; every package any hint names
exists; CI and `make test` go through the same script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.setup import TOOLS as BENCH_TOOLS
from tests.provision import SCRIPT, packages

ROOT = Path(__file__).parents[1]
# "apt-get install [options] pkg..." in a hint, up to the end of the command.
_HINT = re.compile(r"apt-get install((?: +-{1,2}[\w-]+)*)((?: +[a-z0-9][a-z0-9.+-]*)+)")


def _hint_packages() -> dict[str, set[str]]:
    """Package names in every apt-get install hint of the repository: package -> files."""
    found: dict[str, set[str]] = {}
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("benchmarks/*.md"),
             ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run", *ROOT.glob("deploy/*.md")]
    for path in files:
        if path == Path(__file__):  # this file quotes hints to look for
            continue
        text = path.read_text()
        # A computed name must come from a table checked here (benchmarks/setup.py's TOOLS).
        computed = re.findall(r"apt-get install \{(?!TOOLS\[)", text)
        assert not computed, f"{path}: a hint computes a package name; use tests/provision.hint"
        for match in _HINT.finditer(text):
            for package in match.group(2).split():
                found.setdefault(package, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_package_named_exists() -> None:
    named = {p: {"scripts/provision.sh"} for p in packages().values()}
    for package in BENCH_TOOLS.values():
        named.setdefault(package, set()).add("benchmarks/setup.py")
    for package, files in _hint_packages().items():
        named.setdefault(package, set()).update(files)
    assert {"etcd-server", "pebble", "nginx", "haproxy", "wrk", "nghttp2-client"} <= set(named)
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        pytest.skip("no apt-cache here: the package names are checked on Debian (CI)")
    unknown = {}
    for package, files in sorted(named.items()):
        shown = subprocess.run([apt_cache, "show", "--no-all-versions", package], capture_output=True, text=True)
        # "apt-cache show etcd" exits 0 and prints nothing: etcd is only a virtual package on Debian 12.
        if not re.search(rf"^Package: {re.escape(package)}$", shown.stdout, re.M):
            unknown[package] = sorted(files)
    assert not unknown, f"no such Debian package (apt-get install would fail): {unknown}"


def test_every_program_the_tests_need_is_provisioned() -> None:
    listed = packages()
    wanted = set(BENCH_TOOLS) | {"systemd-analyze", "unshare"}
    for path in [*ROOT.glob("tests/**/*.py")]:
        wanted |= set(re.findall(r"require_tool\(\"([\w.-]+)\"\)", path.read_text()))
    # tests/integration/pebble.py runs Debian's Pebble 2.4 (the CA without renewalInfo)
    # through require_tool(name) with the name in a variable.
    if "self.debian" in (ROOT / "tests" / "integration" / "pebble.py").read_text():
        wanted |= {"pebble", "pebble-challtestsrv"}
    wanted |= set(re.findall(r"for tool in \(([^)]*)\)", (ROOT / "tests" / "test_benchmarks.py").read_text())[0]
                  .replace('"', "").replace(",", " ").split())
    assert wanted <= set(listed), f"add these to scripts/provision.sh: {sorted(wanted - set(listed))}"
    assert wanted >= {"etcd", "pebble", "pebble-challtestsrv", "openssl", "nginx", "h2load"}


def test_ci_and_make_test_provision_with_the_same_script() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^scripts/provision\.sh$", ci, re.M) and "apt-get" not in ci
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None
    lines = recipe.group(1).splitlines()
    assert lines[0].strip() == "scripts/provision.sh", "make test provisions before anything else"
    assert os.access(SCRIPT, os.X_OK)


def test_without_privileges_it_stops_with_the_exact_command() -> None:
    # A machine without wrk, where the user cannot install anything: the
    # script must stop at once and print the command to run.
    bin_dir = Path(tempfile.mkdtemp(prefix="provision-bin-"))
    try:
        bin_dir.chmod(0o755)
        for tool in [*packages(), "bash", "sed", "sort", "id", "apt-get", "cat", "env"]:
            found = shutil.which(tool)
            if found and tool != "wrk":  # not one from /usr/sbin: the script looks there too
                (bin_dir / tool).symlink_to(found)
        command = [str(bin_dir / "bash"), "-s"]
        if os.geteuid() == 0:  # root may install: run as nobody, who may not (and has no sudo here)
            setpriv = shutil.which("setpriv") or "setpriv"
            command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--", *command]
        with SCRIPT.open() as script:
            result = subprocess.run(command, stdin=script, capture_output=True, text=True, timeout=60,
                                    env={"PATH": str(bin_dir), "PYTHON": sys.executable, "HOME": "/"})
    finally:
        shutil.rmtree(bin_dir)
    assert result.returncode == 1, result
    assert "sudo apt-get update && sudo apt-get install -y --no-install-recommends wrk" in result.stderr, \
        result.stderr
    assert "installing" not in result.stderr
