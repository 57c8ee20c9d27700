"""The interface every cgroup mode implements: the cgroups of one running stack.

`CgroupManager` does what is the same in every mode (the stack's directory, a service's cgroup2
directory, the default process limit, the order of removal) and leaves to its implementation
what differs: which controllers every service can be given, how a limit is written and where,
and what must exist besides the cgroup2 directory. unified.py and hybrid.py are the two; the
package's `cgroup_manager` picks one from the host's mode, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.errors import HostError
from sandboxd.host.cgroups.group import Cgroup, remove_empty
from sandboxd.host.cgroups.hierarchy import CgroupHost

if TYPE_CHECKING:  # the CLI's quick verbs import this package (state.py): no YAML for them
    from sandboxd.spec.model import Limits

# Controllers every service has a cgroup of its own in, whatever its limits.
ACCOUNTED = ("memory", "pids")
# The order limits are written in. It matters on v1: the memory limit before memsw (which must
# stay >= it).
LIMIT_ORDER = ("memory", "swap", "memory_high", "pids", "cpu", "cpu_weight", "io_weight")
CPU_PERIOD_US = 100_000
# Where each limit goes in a mode: limit name -> (controller, file).
LimitFiles = dict[str, tuple[str, str]]


def cpu_quota_us(cpu: float) -> int:
    """The CPU time a limit of `cpu` CPUs allows per CPU_PERIOD_US (at least 1 ms)."""
    return max(1000, int(cpu * CPU_PERIOD_US))


def plain_values(limits: Limits) -> dict[str, str]:
    """The limits written as they are in every mode (memory, memory_high, pids), keyed by name."""
    values = {"memory": limits.memory, "memory_high": limits.memory_high, "pids": limits.pids}
    return {name: str(value) for name, value in values.items() if value is not None}


class CgroupManager(ABC):
    """Creates and removes the cgroups of one running stack (an "instance").

    Every service is accounted for, limits or not (ACCOUNTED): it has a memory cgroup of its own,
    so the pages it puts in its tmpfs mounts (charged to whoever first touches them) are its own, in
    `sandboxd ps` and against its memory limit, not sandboxd's; and a pids cgroup with the default
    process limit unless `limits.pids` says otherwise."""

    FILES: LimitFiles  # where each limit goes in this mode

    def __init__(self, host: CgroupHost, instance: str) -> None:
        self.host = host
        self.instance_path = host.stack_dir(instance)
        self.created: list[Cgroup] = []
        self.accounted: set[str] = set()  # of ACCOUNTED, the controllers this host gives every service

    # ── what differs per mode ──

    @staticmethod
    @abstractmethod
    def unenforceable(host: CgroupHost, limits: Limits) -> list[str]:
        """The limits this host cannot enforce, each with the reason."""

    @abstractmethod
    def limit_values(self, limits: Limits) -> dict[str, str]:
        """The file contents that set `limits`, keyed by limit name."""

    @abstractmethod
    def _account(self, controller: str) -> str:
        """Make `controller` (of ACCOUNTED) available to every service: "" if done, else why not."""

    @abstractmethod
    def _attach(self, cgroup: Cgroup, values: dict[str, str], parent: Cgroup | None) -> None:
        """Make what `cgroup` needs besides its cgroup2 directory for limits `values` to be written."""

    @abstractmethod
    def _limit_writes(self, cgroup: Cgroup, values: dict[str, str]) -> list[tuple[Path, str]]:
        """The (file, contents) writes that set `values` on `cgroup`, in order."""

    @abstractmethod
    def _v1_dirs(self) -> list[Path]:
        """The stack's v1 directories and their shared parents, removed at teardown if empty."""

    def _v1_stack_dirs(self) -> list[Path]:
        """The stack's own directory in each v1 hierarchy its cgroups may use (none unless hybrid)."""
        return []

    # ── the same in every mode ──

    def stack_dirs(self) -> list[Path]:
        """The stack's own directories (cgroup2, and each v1 hierarchy's on a hybrid host), which
        may not exist yet: every cgroup of the stack is made below one of them."""
        return [self.instance_path, *self._v1_stack_dirs()]

    def setup(self) -> list[str]:
        """Make the stack's cgroup; returns warnings for what of ACCOUNTED the host cannot give."""
        try:
            self.instance_path.mkdir(parents=True, exist_ok=True)
        except PermissionError as e:
            raise HostError(f"cannot create {self.instance_path}: {e.strerror}", "run sandboxd as root") from None
        warnings = []
        for controller in ACCOUNTED:
            why = self._account(controller)
            if not why:
                self.accounted.add(controller)
                continue
            what = "the memory services use is not accounted to each" if controller == "memory" else "services get no default process limit"
            warnings.append(f"{what} ({why})")
        return warnings

    def create(self, name: str, limits: Limits | None = None, parent: Cgroup | None = None) -> Cgroup:
        """A service's cgroup with its limits set (and the default process limit unless it has
        one). With `parent`, a per-connection instance below its service's cgroup, which shares the
        service's limits: many connections cannot add up to the host's pid space."""
        from sandboxd.spec.model import Limits

        if limits is None:
            limits = Limits()
        if "pids" in self.accounted and parent is None:
            limits = limits.with_defaults()
        values = self.limit_values(limits)
        cgroup = Cgroup((parent.path if parent else self.instance_path) / name, can_kill=self.host.kill)
        try:
            cgroup.path.mkdir()
            cgroup.unused = True  # unless _attach finds a v1 directory of it there already
        except FileExistsError:
            pass
        self.created.append(cgroup)
        self._attach(cgroup, values, parent)
        try:
            for file, value in self._limit_writes(cgroup, values):
                file.write_text(value)
                cgroup.settings.append((file, value))
        except OSError as e:
            raise HostError(f"cannot set the limits of {name}: {e.strerror} ({e.filename})", "check the limits against the host, or use limits_optional: true") from None
        return cgroup

    def remove(self, cgroup: Cgroup) -> None:
        """Remove one cgroup before the end (a per-connection instance that ended)."""
        cgroup.remove()
        self.created.remove(cgroup)

    def teardown(self) -> None:
        for cgroup in reversed(self.created):
            cgroup.remove()
        self.created.clear()
        remove_empty(self.instance_path)
        remove_empty(self.host.base)
        for directory in self._v1_dirs():
            remove_empty(directory)
