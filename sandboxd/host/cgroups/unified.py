"""Cgroups on a unified host: cgroup2 alone, for tracking, kill and limits.

A controller works in a cgroup only once every ancestor enables it in cgroup.subtree_control, so
the manager enables what a service's limits need along sandboxd's own subtree (its own cgroup,
<own>/sandboxd, the stack's): sandboxd must run in a cgroup whose controllers are delegated to it
(systemd's Delegate=yes). A per-connection instance gets what its service's siblings get.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.errors import HostError
from sandboxd.host.cgroups.group import Cgroup
from sandboxd.host.cgroups.hierarchy import CgroupHost
from sandboxd.host.cgroups.manager import CPU_PERIOD_US, LIMIT_ORDER, CgroupManager, LimitFiles, cpu_quota_us, plain_values

if TYPE_CHECKING:
    from sandboxd.spec.model import Limits


class UnifiedCgroups(CgroupManager):
    FILES: LimitFiles = {
        "memory": ("memory", "memory.max"),
        "memory_high": ("memory", "memory.high"),
        "swap": ("memory", "memory.swap.max"),
        "pids": ("pids", "pids.max"),
        "cpu": ("cpu", "cpu.max"),
        "cpu_weight": ("cpu", "cpu.weight"),
        "io_weight": ("io", "io.weight"),
    }

    @staticmethod
    def unenforceable(host: CgroupHost, limits: Limits) -> list[str]:
        controllers = host.v2_controllers()
        return [
            f"{name}: the {UnifiedCgroups.FILES[name][0]} controller is not available on this host ({host.mode.value} cgroups)"
            for name in limits.given()
            if UnifiedCgroups.FILES[name][0] not in controllers
        ]

    def limit_values(self, limits: Limits) -> dict[str, str]:
        values = plain_values(limits)
        if limits.swap is not None:  # cgroup2 counts swap alone
            values["swap"] = str(limits.swap)
        if limits.cpu is not None:
            values["cpu"] = f"{cpu_quota_us(limits.cpu)} {CPU_PERIOD_US}"
        if limits.cpu_weight is not None:
            values["cpu_weight"] = str(limits.cpu_weight)
        if limits.io_weight is not None:
            values["io_weight"] = str(limits.io_weight)
        return values

    def _account(self, controller: str) -> str:
        if controller not in self.host.v2_controllers():
            return f"no {controller} controller in {self.host.own}/cgroup.controllers"
        try:
            self._enable_controllers({controller})
        except HostError as e:
            return e.message
        return ""

    def _attach(self, cgroup: Cgroup, values: dict[str, str], parent: Cgroup | None) -> None:
        self._enable_controllers({self.FILES[limit][0] for limit in values})
        if parent is not None:  # the instance gets what its service's siblings get
            self._enable_below(parent.path, set((self.instance_path / "cgroup.subtree_control").read_text().split()))

    def _limit_writes(self, cgroup: Cgroup, values: dict[str, str]) -> list[tuple[Path, str]]:
        return [(cgroup.path / self.FILES[limit][1], values[limit]) for limit in LIMIT_ORDER if limit in values]

    def _v1_dirs(self) -> list[Path]:
        return []

    def _enable_controllers(self, controllers: set[str]) -> None:
        """Enable controllers in cgroup.subtree_control along sandboxd's own subtree."""
        for directory in (self.host.own, self.host.base, self.instance_path):
            self._enable_below(directory, controllers)

    @staticmethod
    def _enable_below(directory: Path, controllers: set[str]) -> None:
        if not controllers:
            return
        try:
            missing = controllers - set((directory / "cgroup.subtree_control").read_text().split())
            if missing:
                (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(missing)))
        except OSError as e:
            raise HostError(
                f"cannot enable {', '.join(sorted(controllers))} in {directory}/cgroup.subtree_control: {e.strerror}",
                "run sandboxd in a cgroup of its own (e.g. systemd-run --scope -p Delegate=yes sandboxd up DIR)",
            ) from None
