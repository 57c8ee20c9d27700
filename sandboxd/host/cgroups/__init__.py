"""cgroups: one per service, below the cgroup sandboxd itself runs in. Only this package knows
/sys/fs/cgroup; every other module and the tests ask it for paths.

The host's mode is detected once (`detect`, as crun's libcrun_get_cgroup_mode does) and hidden
behind one interface, `CgroupManager`, with one implementation per mode, chosen once here:

    UNIFIED  unified.py  cgroup2 at /sys/fs/cgroup: tracking, kill and limits all through it.
    HYBRID   hybrid.py   cgroup2 at /sys/fs/cgroup/unified for tracking and kill; the v1
                         controller hierarchies (memory, pids, cpu, blkio) for limits.
    LEGACY   refused     v1 only: without cgroup2 there is no reliable way to kill a whole
                         service (cgroup.kill) or to know it is empty (cgroup.events).

What a manager does for a stack: `setup` (the stack's cgroup, the controllers every service is
given), `create` (a service's cgroup with its limits set; a per-connection instance below its
service's), `remove` and `teardown`. What a service's `Cgroup` (group.py) does while it runs: how
a process joins it (born in its v2 directory, then `v1_tasks_files`), `stats`, `kill`,
`populated`, `renew` and `remove`. The layout, from hierarchy.py:

    <own v2 cgroup>/sandboxd/<instance>/<service>[/<service>@N]     tracking, kill (and limits, unified)
    <own v1 cgroup>/sandboxd/<instance>/<service>[/<service>@N]     limits, per v1 controller (hybrid)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandboxd.host.cgroups.group import Cgroup, remove_empty
from sandboxd.host.cgroups.hierarchy import CGROUP_ROOT, SANDBOXD, CgroupHost, CgroupMode, cgroup2_of, detect, kill_supported, v1_mounts
from sandboxd.host.cgroups.hybrid import HybridCgroups
from sandboxd.host.cgroups.manager import ACCOUNTED, CgroupManager
from sandboxd.host.cgroups.unified import UnifiedCgroups

if TYPE_CHECKING:
    from sandboxd.spec.model import Limits

MANAGERS: dict[CgroupMode, type[CgroupManager]] = {CgroupMode.UNIFIED: UnifiedCgroups, CgroupMode.HYBRID: HybridCgroups}


def cgroup_manager(host: CgroupHost, instance: str) -> CgroupManager:
    """The manager of stack `instance`'s cgroups, for this host's mode."""
    return MANAGERS[host.mode](host, instance)


def unenforceable(host: CgroupHost, limits: Limits) -> list[str]:
    """The limits this host cannot enforce, each with the reason."""
    return MANAGERS[host.mode].unenforceable(host, limits)


__all__ = [
    "ACCOUNTED",
    "CGROUP_ROOT",
    "MANAGERS",
    "SANDBOXD",
    "Cgroup",
    "CgroupHost",
    "CgroupManager",
    "CgroupMode",
    "HybridCgroups",
    "UnifiedCgroups",
    "cgroup2_of",
    "cgroup_manager",
    "detect",
    "kill_supported",
    "remove_empty",
    "unenforceable",
    "v1_mounts",
]
