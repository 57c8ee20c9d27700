"""Cgroups on a hybrid host: cgroup2 (at /sys/fs/cgroup/unified) for tracking and kill, the v1
controller hierarchies (memory, pids, cpu, blkio) for limits, as runc's v1 manager does.

clone3 can place a child in a v2 cgroup only, so a sandbox is born in its v2 cgroup and joins its
v1 cgroups from inside the child, before exec, by writing "0" to each file in
`Cgroup.v1_tasks_files`: nothing of the service ever runs outside its cgroups. That is one v1
directory per controller (tens of microseconds to make) and one write of the child's own
`tasks` file per hierarchy per launch (see `v1_tasks_files` for why not cgroup.procs). A per-connection instance has a memory cgroup of its own below its
service's and shares the service's other v1 cgroups, so that the service's limits, the process
limit too, hold all its instances together.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.host.cgroups.group import Cgroup
from sandboxd.host.cgroups.hierarchy import SANDBOXD, CgroupHost
from sandboxd.host.cgroups.manager import CPU_PERIOD_US, LIMIT_ORDER, CgroupManager, LimitFiles, cpu_quota_us, plain_values

if TYPE_CHECKING:
    from sandboxd.spec.model import Limits

# A file that exists in sandboxd's own v1 cgroup (even the root one) when the limit can be set below it.
PROBES = {
    "memory": "memory.limit_in_bytes",
    "memory_high": "memory.soft_limit_in_bytes",
    "swap": "memory.memsw.usage_in_bytes",
    "pids": "cgroup.procs",
    "cpu": "cpu.cfs_quota_us",
    "cpu_weight": "cpu.shares",
    "io_weight": "blkio.bfq.io_serviced",
}
MISSING = {
    "memory": "no memory controller",
    "memory_high": "no soft limits",
    "swap": "swap accounting is off; boot with swapaccount=1",
    "pids": "no pids controller",
    "cpu": "CFS bandwidth control is off",
    "cpu_weight": "no CPU shares",
    "io_weight": "the BFQ I/O scheduler is not in use",
}


class HybridCgroups(CgroupManager):
    FILES: LimitFiles = {
        "memory": ("memory", "memory.limit_in_bytes"),
        "memory_high": ("memory", "memory.soft_limit_in_bytes"),
        "swap": ("memory", "memory.memsw.limit_in_bytes"),
        "pids": ("pids", "pids.max"),
        "cpu": ("cpu", "cpu.cfs_quota_us"),
        "cpu_weight": ("cpu", "cpu.shares"),
        "io_weight": ("blkio", "blkio.bfq.weight"),
    }

    def __init__(self, host: CgroupHost, instance: str) -> None:
        super().__init__(host, instance)
        self._made_v1: set[Path] = set()  # the stack's v1 directories made so far

    @staticmethod
    def unenforceable(host: CgroupHost, limits: Limits) -> list[str]:
        problems = []
        for name in limits.given():
            controller, file = HybridCgroups.FILES[name]
            if controller not in host.v1:
                problems.append(f"{name}: the {controller} controller is not available on this host ({host.mode.value} cgroups)")
            elif not (host.v1[controller] / PROBES[name]).exists():
                problems.append(f"{name}: this kernel cannot set {file} ({PROBES[name]} is missing: {MISSING[name]})")
        return problems

    def limit_values(self, limits: Limits) -> dict[str, str]:
        values = plain_values(limits)
        if limits.swap is not None:  # v1 counts memory and swap together
            values["swap"] = str((limits.memory or 0) + limits.swap)
        if limits.cpu is not None:
            values["cpu"] = str(cpu_quota_us(limits.cpu))
        if limits.cpu_weight is not None:
            values["cpu_weight"] = str(max(2, limits.cpu_weight * 1024 // 100))
        if limits.io_weight is not None:
            values["io_weight"] = str(max(1, min(1000, limits.io_weight // 10)))
        return values

    def _account(self, controller: str) -> str:
        if controller in self.host.v1 and (self.host.v1[controller] / PROBES[controller]).exists():
            return ""
        return f"no v1 {controller} hierarchy"

    def _attach(self, cgroup: Cgroup, values: dict[str, str], parent: Cgroup | None) -> None:
        """The cgroup's own v1 directories: one per controller its limits use, and memory always
        (accounted); an instance's memory one only, below its service's, joining the service's others."""
        controllers = {self.FILES[limit][0] for limit in values} | (self.accounted & {"memory"})
        if parent is not None:
            cgroup.joined = {c: path for c, path in parent.v1.items() if c != "memory"}
            controllers &= {"memory"}
        for controller in sorted(controllers):
            base = parent.v1[controller] if parent is not None else self._v1_stack_dir(controller)
            cgroup.v1[controller] = base / cgroup.path.name
            try:
                cgroup.v1[controller].mkdir()
            except FileExistsError:
                cgroup.unused = False

    def _v1_stack_dir(self, controller: str) -> Path:
        directory = self.host.v1_stack_dir(controller, self.instance_path.name)
        if directory not in self._made_v1:  # made once, not again for every service
            directory.mkdir(parents=True, exist_ok=True)
            self._made_v1.add(directory)
        return directory

    def _limit_writes(self, cgroup: Cgroup, values: dict[str, str]) -> list[tuple[Path, str]]:
        writes = []
        for limit in LIMIT_ORDER:
            if limit in values:
                controller, file = self.FILES[limit]
                if limit == "cpu":  # the period before the quota
                    writes.append((cgroup.v1[controller] / "cpu.cfs_period_us", str(CPU_PERIOD_US)))
                writes.append((cgroup.v1[controller] / file, values[limit]))
        return writes

    def _v1_stack_dirs(self) -> list[Path]:
        return [self.host.v1_stack_dir(controller, self.instance_path.name) for controller in self.host.v1]

    def _v1_dirs(self) -> list[Path]:
        instance = self.instance_path.name
        return [path for controller in self.host.v1 for path in (self.host.v1_stack_dir(controller, instance), self.host.v1[controller] / SANDBOXD)]
