"""The programs the tests run and their Debian packages, as scripts/provision.sh
lists them: one list, so that a hint can never name a package that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "provision.sh"


def packages() -> dict[str, str]:
    """program -> Debian package, from the TOOLS table of scripts/provision.sh."""
    table = re.search(r"^TOOLS='\n(.*?)^'", SCRIPT.read_text(), re.S | re.M)
    assert table is not None, f"{SCRIPT} has no TOOLS table"
    return dict(line.split() for line in table.group(1).splitlines() if line.strip())


def hint(tool: str) -> str:
    package = packages().get(tool)
    where = f" (Debian package {package})" if package else ""
    return f"{tool} is not installed{where}: run scripts/provision.sh, which installs what the tests need or says how"
