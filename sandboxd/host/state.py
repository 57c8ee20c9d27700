"""What a running stack created, written down as it is created.

Each running `sandboxd up` has a runtime directory /run/sandboxd/<instance>/ with `state.json`:
the supervisor's pid and every cgroup, socket file and directory it made, rewritten atomically
after each change. A run that was killed with SIGKILL cannot clean up after itself (its services
die with it, see sandbox/forkserver.py); the next run finds its state file, sees that the pid is gone, and
removes what it lists.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.host.paths import RUNTIME_ROOT  # shared with the light CLI side
from sandboxd.host.paths import alive as _alive

if TYPE_CHECKING:
    from sandboxd.spec.model import Stack




@dataclass
class StateRecord:
    directory: Path
    pid: int = field(default_factory=os.getpid)
    cgroups: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    subnets: list[str] = field(default_factory=list)  # so that other stacks choose others
    userns: dict[str, int] = field(default_factory=dict)  # the block of ids held (subids.py), for people and tools
    stop_timeout: float = 10.0  # the longest of its services': how long `sandboxd down` waits before it escalates
    unsaved: str = ""  # why the last save could not be written (the file on disk is the one before)

    def save(self) -> None:
        """Write the record to a temporary file and rename it over state.json: a reader sees the
        old record or the new one, never a part. Should the directory be full (ENOSPC), the old
        record stays, `unsaved` says why, and the next save writes the whole record again."""
        tmp = self.directory / "state.json.tmp"
        data = {"pid": self.pid, "cgroups": self.cgroups, "files": self.files, "dirs": self.dirs, "subnets": self.subnets, "userns": self.userns, "stop_timeout": self.stop_timeout}
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(data))
            os.replace(tmp, self.directory / "state.json")
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            tmp.unlink(missing_ok=True)
            self.unsaved = e.strerror or str(e)
            return
        self.unsaved = ""

    def add(self, kind: str, *paths: str) -> None:
        """Record `paths` (cgroups, files or dirs) just made, in one rewrite of the file."""
        getattr(self, kind).extend(paths)
        self.save()


def instance_name(stack: Stack, project: str | None) -> str:
    return clean_name(project or stack.name)


def clean_name(name: str) -> str:
    """A stack name usable as a directory and cgroup name."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "stack"


def remove_recorded(directory: Path) -> None:
    """Remove everything a (dead) run recorded, then its runtime directory."""
    # Here, not at the top: `sandboxd ls` and `down` import this module for clean_stale, which
    # comes here only for a dead run's leftovers.
    from sandboxd.host.cgroups import SANDBOXD, Cgroup, remove_empty

    try:
        data = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        data = {}
    for path in reversed(data.get("cgroups", [])):
        # Per-connection instances live below a service's or the stack's cgroup: deepest first.
        for cgroup_dir, _subdirs, _files in os.walk(path, topdown=False):
            # A v1 directory has no cgroup.kill (writing one there is refused): what is still in
            # it (the sandboxes of a supervisor killed just now) is killed process by process.
            Cgroup(Path(cgroup_dir), can_kill=(Path(cgroup_dir) / "cgroup.kill").exists()).remove()
    for path in data.get("files", []):
        # Socket files, recorded before they were bound: what is not a socket is not sandboxd's.
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
    for path in reversed(data.get("dirs", [])):
        try:
            os.rmdir(path)
        except OSError:
            pass
    for path in data.get("cgroups", []):
        # The shared "sandboxd" cgroups (v2, and v1 on a hybrid host) go once no stack uses them.
        for ancestor in (Path(path).parent, Path(path).parent.parent):
            if ancestor.name == SANDBOXD:
                remove_empty(ancestor)
    _remove_tree(directory)


def _remove_tree(directory: Path) -> None:
    """rmtree, retried briefly: the sandbox root below it is a mount point in the mount namespaces
    of the dead run's sandboxes, which the kernel tears down a moment after their last process."""
    import shutil

    for _ in range(100):
        try:
            shutil.rmtree(directory)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    shutil.rmtree(directory, ignore_errors=True)


def clean_stale(root: Path = RUNTIME_ROOT) -> list[str]:
    """Remove what dead runs left behind; returns the instance names cleaned."""
    cleaned: list[str] = []
    if not root.is_dir():
        return cleaned
    for directory in root.iterdir():
        state = directory / "state.json"
        try:
            pid = json.loads(state.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue
        if not _alive(pid):
            remove_recorded(directory)
            cleaned.append(directory.name)
    remove_empty_dir(root)
    return cleaned


def remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
