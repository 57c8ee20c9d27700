"""How this host mounts cgroups, found once, and where sandboxd's cgroups lie in that layout.

`detect` reads /proc/self/mountinfo and /proc/self/cgroup (as crun's libcrun_get_cgroup_mode does)
and returns a `CgroupHost`: the mode, where cgroup2 is mounted, the cgroup sandboxd runs in (v2,
and on a hybrid host v1 per controller), and whether this kernel's cgroup2 has cgroup.kill.
Everything else asks the `CgroupHost` for paths: the managers, the state file's clean-up, and the
tests (see `stack_dir`, `v1_stack_dir`), so that no other module spells out /sys/fs/cgroup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from pathlib import Path

from sandboxd.errors import HostError

CGROUP_ROOT = Path("/sys/fs/cgroup")
SANDBOXD = "sandboxd"  # the directory below sandboxd's own cgroup that holds every stack's cgroups
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "blkio", "cpuset", "devices", "freezer")
KILL_SINCE = (5, 14)  # Linux gave every non-root cgroup2 directory a cgroup.kill in 5.14


class CgroupMode(Enum):
    UNIFIED = "unified"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class CgroupHost:
    mode: CgroupMode
    v2_mount: Path  # where cgroup2 is mounted
    own_v2: str  # this process's cgroup2 path, e.g. "/" or "/user.slice/session-1.scope"
    v1: dict[str, Path] = field(default_factory=dict)  # hybrid: controller -> this process's v1 cgroup dir
    kill: bool = True  # cgroup.kill kills a whole cgroup at once (else: SIGKILL to each process in it)

    @property
    def own(self) -> Path:
        """sandboxd's own cgroup2 directory (never made or removed by it)."""
        return self.v2_mount / self.own_v2.lstrip("/")

    @property
    def base(self) -> Path:
        """The cgroup2 directory that holds every stack's cgroup: <own>/sandboxd."""
        return self.own / SANDBOXD

    def stack_dir(self, instance: str) -> Path:
        """A stack's cgroup2 directory; its services' are below it by name, and a per-connection
        instance's below its service's: <base>/<instance>/<service>/<service>@N."""
        return self.base / instance

    def v1_stack_dir(self, controller: str, instance: str) -> Path:
        """A stack's directory in a v1 hierarchy (a hybrid host), laid out as `stack_dir`."""
        return self.v1[controller] / SANDBOXD / instance

    def v2_controllers(self) -> set[str]:
        try:
            return set((self.own / "cgroup.controllers").read_text().split())
        except OSError:
            return set()


def v1_mounts(mountinfo: str | None = None) -> dict[str, Path]:
    """controller -> mount point of its v1 hierarchy (none on a unified host)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    found: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields = post.split()
        if fields and fields[0] == "cgroup":
            for option in fields[-1].split(","):
                if option in V1_CONTROLLERS:
                    found[option] = Path(pre.split()[4])
    return found


def _v2_entry(proc_cgroup: str) -> str | None:
    """The cgroup2 path in the text of a /proc/PID/cgroup file (its "0::" line), or None."""
    return next((line[3:] for line in proc_cgroup.splitlines() if line.startswith("0::")), None)


def cgroup2_of(pid: int) -> str:
    """The cgroup2 path of process `pid` relative to the mount, as in /proc/PID/cgroup ("" if it
    has none). Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/cgroup") as f:
        return _v2_entry(f.read()) or ""


def _cgroup2_mounts(mountinfo: str) -> list[Path]:
    found = []
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        if post.split(" ", 1)[0] == "cgroup2":
            found.append(Path(pre.split()[4]))
    return found


@cache
def kill_supported(release: str = "") -> bool:
    """Whether this kernel's cgroup2 has cgroup.kill (the root cgroup never has it, so the kernel's
    version says, not a file). `release` as uname gives it; "" is this machine's."""
    numbers = (release or os.uname().release).split("-")[0].split(".")
    try:
        return (int(numbers[0]), int(numbers[1])) >= KILL_SINCE
    except (IndexError, ValueError):
        return True  # a version this cannot read is a newer kind of kernel, not an old one


def detect(
    root: Path = CGROUP_ROOT,
    mountinfo: str | None = None,
    self_cgroup: str | None = None,
    release: str = "",
) -> CgroupHost:
    """Find out once how this host mounts cgroups. The arguments exist for tests with a fake tree.

    UNIFIED is cgroup2 at `root`; HYBRID is cgroup2 at `root`/unified beside v1 hierarchies. A
    host with v1 only is refused: without cgroup2 there is no reliable way to kill a whole service
    (cgroup.kill) or to know that it is empty (cgroup.events)."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if self_cgroup is None:
        self_cgroup = Path("/proc/self/cgroup").read_text()
    mounts = _cgroup2_mounts(mountinfo)
    own = _v2_entry(self_cgroup)
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
    v1: dict[str, Path] = {}
    if mode is CgroupMode.HYBRID:
        mounts1 = v1_mounts(mountinfo)
        for line in self_cgroup.splitlines():
            _number, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                if controller in mounts1:
                    v1[controller] = mounts1[controller] / path.strip().lstrip("/")
    return CgroupHost(mode, v2, own, v1, kill_supported(release))
