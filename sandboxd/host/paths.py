"""Where a running stack lives on the host, and whether the process that runs it is alive.

Standard library only: the CLI's quick verbs (`sandboxd ps --json`) import this, the supervisor,
the network and state modules too, so that all of them agree on one runtime root.

    RUNTIME_ROOT/<instance>/           one directory per running stack (SANDBOXD_RUNTIME_DIR, else /run/sandboxd)
        state.json                     the supervisor's pid and what it made (state.py)
        control.sock                   the control socket (daemon/control.py)
        logs/, notify/, etc/, root/    its logs, notify sockets, generated /etc files, sandbox root
"""

from __future__ import annotations

import os
from pathlib import Path

RUNTIME_ROOT = Path(os.environ.get("SANDBOXD_RUNTIME_DIR", "/run/sandboxd"))


def sandbox_root(runtime_dir: Path) -> Path:
    """Where a stack whose runtime directory is `runtime_dir` builds its sandboxes' roots."""
    return runtime_dir / "root"


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, killed but not yet reaped, is not)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
