"""The README's tour, as written: what it tells a new user to run must not
publish the development CA's private key."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.conftest import free_port

ROOT = Path(__file__).parents[1]


def tour_commands() -> list[str]:
    """The shell lines of the README's "A five-minute tour" block (continuations joined)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A five-minute tour", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    text = block.group(1).replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def status(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_the_tour_app_does_not_serve_the_dev_ca_key(tmp_path: Path) -> None:
    # A checkout after `make serve`: var/dev/ holds the CA key. Run the tour's
    # app commands from it, as the tour does (its folder and port made private here).
    checkout = tmp_path / "checkout"
    (checkout / "var" / "dev").mkdir(parents=True)
    (checkout / "var" / "dev" / "ca.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    port = free_port()
    commands = [c for c in tour_commands() if c.startswith(("mkdir", "echo", "python3 -m http.server"))]
    assert any("http.server" in c for c in commands), commands
    script = "\n".join(c.replace("/tmp/demo-site", str(tmp_path / "demo-site")).replace("9001", str(port))
                       for c in commands)
    server = subprocess.Popen(["bash", "-c", script + "\nwait"], cwd=checkout, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                code, body = status(f"http://127.0.0.1:{port}/")
                break
            except OSError:
                assert time.monotonic() < deadline, "the tour's app did not start"
                time.sleep(0.05)
        assert code == 200 and body == b"hello from demo\n"
        assert status(f"http://127.0.0.1:{port}/var/dev/ca.key")[0] == 404
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(5)
