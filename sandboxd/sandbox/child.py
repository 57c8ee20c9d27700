"""What the fork server and the set-up interpreter share of a sandbox's init, and two answers
of the host's that its program needs.

The init is cloned by the set-up interpreter itself (setup/sbd-setup.c, `spawn`: the fork
server starts it with vfork semantics, forkserver.py), so no Python runs in it: in a user
namespace it becomes root inside (setgroups, setresgid and setresuid to the mapped 0) once the
spawner has written its maps, then walks its program (program.py) op by op and reports on the
status channel: Executing, then init_exec (the command forked as pid 2 and executed, this process
staying as its init; the channel's EOF once the command executed), or the first SetupFailed(step,
detail, path) and exit EXIT_SETUP_FAILED (EXIT_UNEXPECTED for a malformed program; a command that
cannot be executed: 127 not found, 126 otherwise).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sandboxd.kernel.seam import EntryKind

EXIT_SETUP_FAILED = 127
EXIT_UNEXPECTED = 126

SETUP_BINARY = Path(__file__).parent / "setup" / "sbd-setup"  # built by scripts/install (scripts/build-setup.sh)
SETUP_NAME = "sbd-setup"


def root_entries(path: str = "/") -> tuple[tuple[str, EntryKind, str], ...]:
    """The host root's top-level entries (name, kind, a symlink's target) for a `tmpfs-root`,
    listed by the fork server: the child's mount namespace is a copy of its own until the child's
    first mount (program.HostView)."""
    entries: list[tuple[str, EntryKind, str]] = []
    with os.scandir(path) as found:
        for entry in found:
            if entry.is_symlink():
                entries.append((entry.name, "symlink", os.readlink(entry.path)))
            else:
                entries.append((entry.name, "dir" if entry.is_dir() else "other", ""))
    return tuple(entries)


def is_dir_fd(fd: int) -> bool:
    """Whether a detached tree the fork server holds is a directory (else a file's mount)."""
    return stat.S_ISDIR(os.fstat(fd).st_mode)
