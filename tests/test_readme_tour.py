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


def test_the_tour_runs_as_written(tmp_path: Path) -> None:
    # Every command of the tour, in order, against a real edge on the tour's
    # platform domain; only ports and folders are made private to this test.
    from tests.integration.conftest import EDGE, EdgeProcess

    edge = EdgeProcess(tmp_path / "edge")
    https, http, app = free_port(), free_port(), free_port()
    edge.config.write_text(edge.config.read_text()
                           .replace('https = ["127.0.0.1:0"]', f'https = ["127.0.0.1:{https}"]')
                           .replace('http = ["127.0.0.1:0"]', f'http = ["127.0.0.1:{http}"]')
                           .replace('domain = "edge.test"', 'domain = "edge.localhost"'))
    readme = (ROOT / "README.md").read_text().split("## A five-minute tour", 1)[1]
    refused = re.search(r"\n(\.venv/bin/edge [^\n]*)\n# edge: error:", readme)
    assert refused is not None, "step 4 shows a refused upload"

    def private(command: str) -> str:
        return (command.replace(".venv/bin/edge", f"{EDGE} --config {edge.config}")
                .replace("var/dev/ca.crt", str(edge.dev_ca)).replace("/tmp/demo-site", str(tmp_path / "site"))
                .replace(":8443", f":{https}").replace(":8080", f":{http}").replace("9001", str(app)))

    lines = []
    for command in map(private, tour_commands()):
        if command == private(refused.group(1).split("  #")[0].strip()):
            command = f"! {command}"  # the refusal the tour shows: it must fail
        lines.append(command)
        if command.startswith("python3 -m http.server"):  # a person types slower than it starts
            lines.append(f"for _ in $(seq 100); do curl -so /dev/null 127.0.0.1:{app} && break; sleep 0.05; done")
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n" + "\n".join(lines) + "\n"
    edge.start()
    try:
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        edge.stop()
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    assert f"app demo added: https://demo.edge.localhost:{https} -> 127.0.0.1:{app}" in out  # a URL that works
    assert out.count("hello from demo") == 3  # the app, then shop.localhost with each certificate
    assert f"Location: https://demo.edge.localhost:{https}/" in out
    assert "the private key does not match the certificate" in result.stderr
