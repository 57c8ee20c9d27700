"""The host ids that root inside a `userns: true` sandbox maps to: the `sandboxd` user's range.

As podman and docker's userns-remap do, sandboxd takes its range from /etc/subuid and
/etc/subgid. If the `sandboxd` user has none, it creates the (system, login-less) user with
useradd and gives it 65536 ids after the highest range already handed out (at least 100000), in
both files. Every userns sandbox uses the same range, as docker's userns-remap does: root in one
is the same unprivileged uid on the host as root in another (they cannot see each other's
processes, which live in separate pid namespaces).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import HostError

USER = "sandboxd"
COUNT = 65536
FIRST = 100000


def _ranges(path: Path) -> list[tuple[str, int, int]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            found.append((parts[0], int(parts[1]), int(parts[2])))
    return found


def userns_range(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> tuple[int, int]:
    """(first host id, count) for the sandboxd user, creating the user and its ranges if needed."""
    mine = [(first, count) for name, first, count in _ranges(subuid) if name == USER]
    if mine and any(name == USER for name, _, _ in _ranges(subgid)):
        return mine[0][0], min(mine[0][1], COUNT)
    _ensure_user()
    taken = _ranges(subuid) + _ranges(subgid)
    first = max([FIRST, *(start + count for _, start, count in taken)])
    for path in (subuid, subgid):
        if not any(name == USER for name, _, _ in _ranges(path)):
            with path.open("a") as f:
                f.write(f"{USER}:{first}:{COUNT}\n")
    return first, COUNT


def _ensure_user() -> None:
    try:
        import pwd

        pwd.getpwnam(USER)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise HostError(f"userns: true needs a '{USER}' user with ranges in /etc/subuid and /etc/subgid", f"create it: useradd --system {USER}")
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], capture_output=True, text=True
    )
    if result.returncode not in (0, 9):  # 9: it exists already
        raise HostError(f"cannot create the '{USER}' user: {result.stderr.strip()}", f"create it yourself: useradd --system {USER}")
