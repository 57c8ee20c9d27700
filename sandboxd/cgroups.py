"""cgroups: one per service, below the cgroup sandboxd itself runs in.

The host's mode is detected once (as crun's libcrun_get_cgroup_mode does) and hidden behind one
interface:

    UNIFIED  cgroup2 at /sys/fs/cgroup: tracking, kill and (later) limits all through it.
    HYBRID   cgroup2 at /sys/fs/cgroup/unified for tracking and kill; the v1 controller
             hierarchies (memory, pids, cpu) are where limits will go.
    LEGACY   v1 only: refused with a clear error, because without cgroup2 there is no reliable
             way to kill a whole service (cgroup.kill) or to know it is empty (cgroup.events).

Layout: <own v2 cgroup>/sandboxd/<instance>/<service>. A process joins by writing "0" to each
file in `Cgroup.procs_files` from inside the child, before exec, so nothing of the service ever
runs outside its cgroup. Only this module knows /sys/fs/cgroup.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .errors import HostError

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupMode(Enum):
    UNIFIED = "unified"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class CgroupHost:
    mode: CgroupMode
    v2_mount: Path  # where cgroup2 is mounted
    own_v2: str  # this process's cgroup2 path, e.g. "/" or "/user.slice/session-1.scope"

    @property
    def base(self) -> Path:
        return self.v2_mount / self.own_v2.lstrip("/") / "sandboxd"


def _cgroup2_mounts(mountinfo: str) -> list[Path]:
    found = []
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        if post.split(" ", 1)[0] == "cgroup2":
            found.append(Path(pre.split()[4]))
    return found


def detect(
    root: Path = CGROUP_ROOT,
    mountinfo: str | None = None,
    self_cgroup: str | None = None,
) -> CgroupHost:
    """Find out once how this host mounts cgroups. The arguments exist for tests with a fake tree."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if self_cgroup is None:
        self_cgroup = Path("/proc/self/cgroup").read_text()
    mounts = _cgroup2_mounts(mountinfo)
    own = next((line[3:] for line in self_cgroup.splitlines() if line.startswith("0::")), None)
    if root in mounts:
        mode, v2 = CgroupMode.UNIFIED, root
    elif root / "unified" in mounts:
        mode, v2 = CgroupMode.HYBRID, root / "unified"
    else:
        raise HostError(
            f"no cgroup2 hierarchy is mounted at {root} or {root}/unified; sandboxd needs cgroup2 to track and kill services",
            "boot with systemd.unified_cgroup_hierarchy=1 (or mount cgroup2 at /sys/fs/cgroup/unified for a hybrid layout)",
        )
    if own is None:
        raise HostError("this process has no cgroup2 entry in /proc/self/cgroup", "check that cgroup2 is mounted")
    own = own.strip() or "/"
    own = own.removesuffix(" (deleted)")
    return CgroupHost(mode, v2, own)


class Cgroup:
    """One service's cgroup."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.killed = False

    @property
    def extra_procs_files(self) -> tuple[str, ...]:
        """cgroup.procs files of other hierarchies to join besides the v2 one (v1 limits, later)."""
        return ()

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def cpu_usage_usec(self) -> int:
        """CPU time used by the cgroup so far (cgroup2's cpu.stat has it without any controller)."""
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def holds_sockets_besides(self, listening: list[socket.socket]) -> bool:
        """Whether any process in the cgroup has a socket open other than `listening` (a connection)."""
        known = {f"socket:[{os.fstat(s.fileno()).st_ino}]" for s in listening}
        for pid in self.pids():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:") and target not in known:
                    return True
        return False

    def populated(self) -> bool:
        try:
            text = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return False
        return "populated 1" in text

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (cgroup.kill; a loop over cgroup.procs before Linux 5.14)."""
        self.killed = True
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists():
            try:
                kill_file.write_text("1")
            except FileNotFoundError:
                pass
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def renew(self) -> None:
        """Give a killed cgroup a fresh directory before a process is born in it again.

        Linux 6.x (seen on 6.18) kills a child that clone3 places (CLONE_INTO_CGROUP) into a cgroup
        that was ever killed through cgroup.kill, so a cgroup is used again only if never killed.
        """
        if self.killed:
            self.remove()
            self.path.mkdir()
            self.killed = False

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left, wait until empty, and remove the directory."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            self.kill()
            time.sleep(0.002)


class CgroupManager:
    """Creates and removes the cgroups of one running stack (an "instance")."""

    def __init__(self, host: CgroupHost, instance: str) -> None:
        self.host = host
        self.instance_path = host.base / instance
        self.created: list[Cgroup] = []

    def setup(self) -> None:
        try:
            self.instance_path.mkdir(parents=True, exist_ok=True)
        except PermissionError as e:
            raise HostError(f"cannot create {self.instance_path}: {e.strerror}", "run sandboxd as root") from None

    def create(self, name: str) -> Cgroup:
        cg = Cgroup(self.instance_path / name)
        cg.path.mkdir(exist_ok=True)
        self.created.append(cg)
        return cg

    def remove(self, cgroup: Cgroup) -> None:
        """Remove one cgroup before the end (a per-connection instance that ended)."""
        cgroup.remove()
        self.created.remove(cgroup)

    def teardown(self) -> None:
        for cg in reversed(self.created):
            cg.remove()
        self.created.clear()
        remove_empty(self.instance_path)
        remove_empty(self.host.base)


def remove_empty(path: Path) -> None:
    """rmdir a cgroup directory if it is empty; another stack may still use a shared parent."""
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise
