"""Bind-mount sources, resolved once and held open for the life of the stack.

A path names whatever is there when it is looked up. If a sandbox's bind mounts were looked up by
path at every start, anyone who can write a folder on the way (another stack with a writable
mount of a parent folder, or the service itself through `./data` mounted writable above
`./data/x`) could swap a folder for a symlink between two starts, and the next restart would mount
the host path the symlink names, writable if the mount is. So each source is opened once, as an
O_PATH descriptor, and every start mounts what that descriptor holds; what happens to the path
afterwards changes nothing.

    load_stack (spec/load.py)       pin_mounts (up, and a reload)       every start and restart
    ─────────────────────────       ─────────────────────────────       ───────────────────────────────
    open_source: a relative         open_source again; the supervisor   the descriptors go with the launch
    source only beneath the spec    holds the descriptor for the        request (SCM_RIGHTS); the fork
    folder, else an error with      service (ServiceRuntime.sources,    server copies each tree
    file, line and key; the         by the plan's source path) until    (open_tree, sandbox/detached.py
    source is the path it really    the service is removed or the       `detached_bind`), the sandbox
    names                           stack is down                       attaches the copy (move_mount)

Relative sources are opened with openat2(RESOLVE_BENEATH) from the spec folder: a `..` above it,
an absolute symlink, or a relative one that leads out of it is refused (EXDEV); a symlink that
stays inside is followed. Absolute sources are the admin's own words and are followed as written,
then held the same way. Volumes are opened beneath the volumes folder with no symlink at all.
sandboxd's own files (a service's notify socket, /etc/hosts and resolv.conf of a service on a
network, the socket files of `uses:`) are opened by the supervisor once it made them, without
following a symlink (`pin_own`), and reopened only when sandboxd makes them anew.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.kernel import linux
from sandboxd.errors import SpecError, SpecErrors
from sandboxd.spec.sources import open_source, source_problem

if TYPE_CHECKING:
    from sandboxd.spec.model import Stack

SourceFds = dict[str, int]  # a bind mount's source path (as in the plan) -> the O_PATH descriptor held


def pin_mounts(stack: Stack, volumes_dir: Path) -> dict[str, SourceFds]:
    """Open the `mounts:` sources and volumes of every service of `stack`, by service name.
    Raises SpecErrors, holding nothing, if any cannot be opened as validation allowed."""
    pinned: dict[str, SourceFds] = {}
    errors: list[SpecError] = []
    volumes_fd = -1
    try:
        for service in stack.services:
            fds = pinned.setdefault(service.name, {})
            for index, mount in enumerate(service.mounts):
                if mount.volume:
                    path, key = str(volumes_dir / mount.volume), f"mounts[{index}].volume"
                else:
                    assert mount.source is not None
                    path, key = str(mount.source), f"mounts[{index}].source"
                if path in fds:
                    continue
                try:
                    if mount.volume:
                        if volumes_fd < 0:
                            volumes_fd = os.open(volumes_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                        fds[path] = linux.open_beneath(volumes_fd, mount.volume, os.O_PATH | os.O_DIRECTORY, symlinks=False, name=path)
                    else:
                        fds[path] = open_source(stack.folder, mount.given)
                except OSError as e:
                    message = f"volume '{mount.volume}' cannot be opened: {e.strerror} ({path})" if mount.volume else source_problem(stack.folder, mount.given, e)
                    errors.append(SpecError(service.file, mount.line, key, message))
    finally:
        if volumes_fd >= 0:
            os.close(volumes_fd)
    if errors:
        for fds in pinned.values():
            close_all(fds)
        raise SpecErrors(errors)
    return pinned


def pin_own(path: str) -> int:
    """An O_PATH descriptor of a file sandboxd itself just made (not through a symlink)."""
    return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)


def close_all(fds: SourceFds) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()
