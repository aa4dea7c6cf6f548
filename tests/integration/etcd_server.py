"""A real etcd server on loopback ports of its own, and edge nodes on it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from edge.store.etcd import EtcdStore
from tests.integration.conftest import EdgeProcess, free_port, require_tool, wait_for


class Etcd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        binary = require_tool("etcd")
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [binary, "--data-dir", str(self.root / "data"), "--name", "default",
             "--listen-client-urls", f"http://{self.endpoint}", "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"default={peer}"],
            stdout=open(self.root / "etcd.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )
        wait_for(lambda: asyncio.run(EtcdStore((self.endpoint,)).check()) == [], timeout=20, interval=0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def etcd_node(root: Path, etcd: Etcd) -> EdgeProcess:
    node = EdgeProcess(root)
    node.config.write_text(node.config.read_text().replace(
        '[store]\npath = "store"',
        f'[store]\nbackend = "etcd"\n[store.etcd]\nendpoints = ["{etcd.endpoint}"]\nprefix = "/edge/"'))
    return node
