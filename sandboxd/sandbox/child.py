"""The sandbox's init between the fork server's clone and the exec of the set-up interpreter.

The fork server clones this child as pid 1 of a new pid namespace (and, in a user namespace,
lets it go once its id maps are written: forkserver.py). It is still a copy of the fork
server's Python heap, and every page it touches is copied (that used to cost about 6 ms a
sandbox), so it does almost nothing here:

    become root of the user ns       setgroups, setresgid and setresuid to the mapped 0: before
                                     the exec, since an exec by a uid other than the namespace's
                                     root would clear the capabilities
    execute the set-up interpreter   setup/sbd-setup, the fork server's sealed copy of it (by
                                     descriptor), with the program (program.py) on a pipe

The interpreter (setup/sbd-setup.c) does the rest, op by op, and reports on the status channel
as this process would: Executing, then the exec of the init, or the first SetupFailed(step,
detail, path) and exit 127. If the exec of the interpreter itself fails, this process reports
that and exits 127 (126 for anything but an OSError).

The descriptors the program names are inherited across that exec: the fork server makes them
inheritable for the moment of the clone (forkserver.py), everything else of its own is
close-on-exec.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import NoReturn

from sandboxd.kernel.seam import EntryKind, Kernel
from sandboxd.sandbox.confine import Step, become_userns_root, failure, report

EXIT_SETUP_FAILED = 127
EXIT_UNEXPECTED = 126

SETUP_BINARY = Path(__file__).parent / "setup" / "sbd-setup"  # built by scripts/install (scripts/build-setup.sh)
SETUP_NAME = "sbd-setup"


def enter_setup(kernel: Kernel, userns: bool, interpreter: int, program: int, channel: int, sysfs: int) -> NoReturn:
    """In the cloned child: root of its user namespace (`userns`), then the set-up interpreter
    (`interpreter`, a sealed copy), reading its program from `program` and reporting on `channel`."""
    step = Step("become root of the user namespace")
    try:
        if userns:
            become_userns_root(kernel)
        step.name = "execute the set-up interpreter"
        kernel.execve(interpreter, [SETUP_NAME, str(program), str(channel), str(sysfs)], {})
    except OSError as e:
        code = EXIT_SETUP_FAILED
        message = failure(step, e, code)
    except Exception as e:  # noqa: BLE001 - the child must never unwind into the fork server's loop
        code = EXIT_UNEXPECTED
        message = failure(step, e, code)
    status = socket.socket(fileno=channel)
    report(kernel, status, message)
    status.detach()
    kernel.exit(code)


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
