"""Install the benchmark tools when missing (Debian packages), or say which are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client", "taskset": "util-linux",
         "etcd": "etcd-server"}


def main() -> int:
    missing = {tool: package for tool, package in TOOLS.items() if shutil.which(tool) is None}
    if not missing:
        return 0
    packages = sorted(set(missing.values()))
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(packages)}", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=False, env=env)
    still = [tool for tool in missing if shutil.which(tool) is None]
    for tool in still:
        print(f"benchmarks: {tool} is missing (apt-get install {TOOLS[tool]}); "
              "scenarios or peers that need it are skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
