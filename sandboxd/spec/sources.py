"""Opening a bind mount's source as a spec file names it, the one way for every reader.

A `mounts:` source is checked while the spec is read (load.py: it must exist, and a relative one
must stay inside the spec folder) and opened again when the stack is brought up, to be held for
the stack's life (host/pins.py says why). Both open it here, the same way: an absolute path is
the admin's own words and is followed as written; a relative one is opened with
openat2(RESOLVE_BENEATH) from the spec folder, so a `..` above it, an absolute symlink, or a
relative one that leads out of it is refused (EXDEV), and a symlink that stays inside is followed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from sandboxd.kernel import linux


def open_source(folder: Path, given: str) -> int:
    """An O_PATH descriptor of a `mounts:` source as written in a spec file of `folder`: an
    absolute path as it is, a relative one beneath the folder. Raises OSError."""
    if given.startswith("/"):
        return os.open(given, os.O_PATH | os.O_CLOEXEC)
    folder_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return linux.open_beneath(folder_fd, given, os.O_PATH, name=os.path.join(folder, given))
    finally:
        os.close(folder_fd)


def real_path(fd: int) -> Path:
    """The path a descriptor names now (through /proc/self/fd), symlinks resolved."""
    return Path(os.readlink(f"/proc/self/fd/{fd}"))


def source_problem(folder: Path, given: str, error: OSError) -> str:
    """What to say when `open_source` failed."""
    looked = os.path.normpath(os.path.join(folder, given))
    match error.errno:
        case errno.ENOENT:
            return f"mount source '{given}' does not exist (looked for {looked})"
        case errno.EXDEV:
            return (
                f"mount source '{given}' leads out of the spec folder {folder} (through '..' or a symlink); "
                "a relative source must stay inside it: write an absolute path if a host path outside is meant"
            )
        case errno.ELOOP:
            return f"mount source '{given}' has too many levels of symlinks (looked for {looked})"
        case errno.ENOTDIR:
            return f"mount source '{given}': a part of the path is not a folder (looked for {looked})"
    return f"mount source '{given}' cannot be opened: {error.strerror} (looked for {looked})"
