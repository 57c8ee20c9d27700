"""cgroups: one per service, below the cgroup sandboxd itself runs in.

The host's mode is detected once (as crun's libcrun_get_cgroup_mode does) and hidden behind one
interface:

    UNIFIED  cgroup2 at /sys/fs/cgroup: tracking, kill and (later) limits all through it.
    HYBRID   cgroup2 at /sys/fs/cgroup/unified for tracking and kill; the v1 controller
             hierarchies (memory, pids, cpu) are where limits will go.
    LEGACY   v1 only: refused with a clear error, because without cgroup2 there is no reliable
             way to kill a whole service (cgroup.kill) or to know it is empty (cgroup.events).

Layout: <own v2 cgroup>/sandboxd/<instance>/<service>, and the per-connection instances of an
accept service below its cgroup: <service>/<service>@N. A sandbox is born in its v2 cgroup
(clone3 with CLONE_INTO_CGROUP); on a hybrid host it then joins its v1 cgroups by writing "0" to
each file in `Cgroup.extra_procs_files` from inside the child, before exec, so nothing of the
service ever runs outside its cgroups. Only this module knows /sys/fs/cgroup.

Every service is accounted for, limits or not (`ACCOUNTED`): it has a memory cgroup of its own,
so the pages it puts in its tmpfs mounts (charged to whoever first touches them) are its own, in
`sandboxd ps` and against its memory limit, not sandboxd's; and a pids cgroup with the default
process limit unless `limits.pids` says otherwise. On a hybrid host that is one v1 directory
(tens of microseconds to make) and one write of cgroup.procs per hierarchy per launch: clone3 can
place a child in a v2 cgroup only. The instances of an accept service each have a memory cgroup
of their own below the service's, and share the service's other v1 cgroups: its limits, the
process limit too, hold all its instances together, so that many connections cannot add up to
the host's pid space.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.errors import HostError

if TYPE_CHECKING:  # the CLI's quick verbs import this module (state.py): no YAML for them
    from sandboxd.spec.model import Limits

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupMode(Enum):
    UNIFIED = "unified"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class CgroupHost:
    mode: CgroupMode
    v2_mount: Path  # where cgroup2 is mounted
    own_v2: str  # this process's cgroup2 path, e.g. "/" or "/user.slice/session-1.scope"
    v1: dict[str, Path] = field(default_factory=dict)  # hybrid: controller -> this process's v1 cgroup dir

    @property
    def base(self) -> Path:
        return self.v2_mount / self.own_v2.lstrip("/") / "sandboxd"

    def v2_controllers(self) -> set[str]:
        try:
            return set((self.v2_mount / self.own_v2.lstrip("/") / "cgroup.controllers").read_text().split())
        except OSError:
            return set()


# Where each limit goes: (v1 controller, v1 file) on a hybrid host, (v2 controller, v2 file) on a unified one.
LIMIT_FILES: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "memory": (("memory", "memory.limit_in_bytes"), ("memory", "memory.max")),
    "memory_high": (("memory", "memory.soft_limit_in_bytes"), ("memory", "memory.high")),
    "swap": (("memory", "memory.memsw.limit_in_bytes"), ("memory", "memory.swap.max")),
    "pids": (("pids", "pids.max"), ("pids", "pids.max")),
    "cpu": (("cpu", "cpu.cfs_quota_us"), ("cpu", "cpu.max")),
    "cpu_weight": (("cpu", "cpu.shares"), ("cpu", "cpu.weight")),
    "io_weight": (("blkio", "blkio.bfq.weight"), ("io", "io.weight")),
}
CPU_PERIOD_US = 100_000
# A file that exists in sandboxd's own v1 cgroup (even the root one) when the limit can be set below it.
V1_PROBES = {
    "memory": "memory.limit_in_bytes",
    "memory_high": "memory.soft_limit_in_bytes",
    "swap": "memory.memsw.usage_in_bytes",
    "pids": "cgroup.procs",
    "cpu": "cpu.cfs_quota_us",
    "cpu_weight": "cpu.shares",
    "io_weight": "blkio.bfq.io_serviced",
}
V1_MISSING = {
    "memory": "no memory controller",
    "memory_high": "no soft limits",
    "swap": "swap accounting is off; boot with swapaccount=1",
    "pids": "no pids controller",
    "cpu": "CFS bandwidth control is off",
    "cpu_weight": "no CPU shares",
    "io_weight": "the BFQ I/O scheduler is not in use",
}


# Controllers every service has a cgroup of its own in, whatever its limits.
ACCOUNTED = ("memory", "pids")


def limit_values(limits: Limits, mode: CgroupMode) -> dict[str, str]:
    """The file contents that set `limits`, keyed by limit name."""
    values: dict[str, str] = {}
    if limits.memory is not None:
        values["memory"] = str(limits.memory)
    if limits.memory_high is not None:
        values["memory_high"] = str(limits.memory_high)
    if limits.swap is not None:  # v1 counts memory and swap together; v2 counts swap alone
        values["swap"] = str((limits.memory or 0) + limits.swap if mode is CgroupMode.HYBRID else limits.swap)
    if limits.pids is not None:
        values["pids"] = str(limits.pids)
    if limits.cpu is not None:
        quota = max(1000, int(limits.cpu * CPU_PERIOD_US))
        values["cpu"] = str(quota) if mode is CgroupMode.HYBRID else f"{quota} {CPU_PERIOD_US}"
    if limits.cpu_weight is not None:
        values["cpu_weight"] = str(max(2, limits.cpu_weight * 1024 // 100)) if mode is CgroupMode.HYBRID else str(limits.cpu_weight)
    if limits.io_weight is not None:
        values["io_weight"] = str(limits.io_weight if mode is CgroupMode.UNIFIED else max(1, min(1000, limits.io_weight // 10)))
    return values


def unenforceable(host: CgroupHost, limits: Limits) -> list[str]:
    """The limits this host cannot enforce, each with the reason."""
    problems = []
    controllers = host.v2_controllers() if host.mode is CgroupMode.UNIFIED else set(host.v1)
    for name in limits.given():
        v1, v2 = LIMIT_FILES[name]
        controller, file = v1 if host.mode is CgroupMode.HYBRID else v2
        if controller not in controllers:
            problems.append(f"{name}: the {controller} controller is not available on this host ({host.mode.value} cgroups)")
        elif host.mode is CgroupMode.HYBRID and not (host.v1[controller] / V1_PROBES[name]).exists():
            problems.append(f"{name}: this kernel cannot set {file} ({V1_PROBES[name]} is missing: {V1_MISSING[name]})")
    return problems


def _cgroup1_mounts(mountinfo: str) -> dict[str, Path]:
    """controller -> mount point of its v1 hierarchy."""
    found: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields = post.split()
        if fields and fields[0] == "cgroup":
            for option in fields[-1].split(","):
                if option in ("memory", "pids", "cpu", "cpuacct", "blkio", "cpuset", "devices", "freezer"):
                    found[option] = Path(pre.split()[4])
    return found


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
    v1: dict[str, Path] = {}
    if mode is CgroupMode.HYBRID:
        mounts1 = _cgroup1_mounts(mountinfo)
        for line in self_cgroup.splitlines():
            _number, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                if controller in mounts1:
                    v1[controller] = mounts1[controller] / path.strip().lstrip("/")
    return CgroupHost(mode, v2, own, v1)


class Cgroup:
    """One service's cgroup: a v2 directory, and on a hybrid host its v1 directories (its own, and
    for a per-connection instance those of its service that it joins)."""

    def __init__(self, path: Path, v1: dict[str, Path] | None = None, joined: dict[str, Path] | None = None) -> None:
        self.path = path
        self.v1 = v1 or {}  # controller -> a v1 directory of its own
        self.joined = joined or {}  # controller -> its service's v1 directory (not removed with it)
        self.killed = False
        self.baseline: dict[str, int] = {}
        self.settings: list[tuple[Path, str]] = []  # the limit files written, in order

    @property
    def extra_procs_files(self) -> tuple[str, ...]:
        """cgroup.procs files of the v1 hierarchies to join besides the v2 one (a hybrid host)."""
        return tuple(str(path / "cgroup.procs") for path in [*self.v1.values(), *self.joined.values()])

    def _read_int(self, path: Path, key: str | None = None) -> int:
        try:
            text = path.read_text()
        except OSError:
            return 0
        if key is None:
            return int(text.split()[0]) if text.split() else 0
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
        return 0

    def stats(self) -> dict[str, int]:
        """Memory now and at peak (bytes), CPU time (µs), processes, OOM kills and pids-limit hits."""
        result = {"cpu_usec": self.cpu_usage_usec(), "processes": len(self.pids())}
        if "memory" in self.v1:
            memory = self.v1["memory"]
            result["memory_current"] = self._read_int(memory / "memory.usage_in_bytes")
            result["memory_peak"] = self._read_int(memory / "memory.max_usage_in_bytes")
            result["oom_kills"] = self._read_int(memory / "memory.oom_control", "oom_kill")
        elif (self.path / "memory.current").exists():
            result["memory_current"] = self._read_int(self.path / "memory.current")
            result["memory_peak"] = self._read_int(self.path / "memory.peak")
            result["oom_kills"] = self._read_int(self.path / "memory.events", "oom_kill")
        else:  # no memory controller for this service: the resident memory of its processes
            result["memory_current"] = sum(self._rss(pid) for pid in self.pids())
        pids_events = (self.v1["pids"] if "pids" in self.v1 else self.path) / "pids.events"
        result["pids_limit_hits"] = self._read_int(pids_events, "max")
        return result

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _counters(self) -> dict[str, int]:
        """Just the OOM-kill and pids-limit counters (cheap: read at every launch)."""
        memory_events = self.v1["memory"] / "memory.oom_control" if "memory" in self.v1 else self.path / "memory.events"
        pids_events = (self.v1["pids"] if "pids" in self.v1 else self.path) / "pids.events"
        return {"oom_kills": self._read_int(memory_events, "oom_kill"), "pids_limit_hits": self._read_int(pids_events, "max")}

    def mark(self) -> None:
        """Remember the counters now, so that `why_failed` sees only what happened since."""
        self.baseline = self._counters()

    def why_failed(self) -> str:
        """"oom-killed" or "pids limit reached" if that happened since `mark`, else ""."""
        now = self._counters()
        if now.get("oom_kills", 0) > self.baseline.get("oom_kills", 0):
            return "oom-killed"
        if now.get("pids_limit_hits", 0) > self.baseline.get("pids_limit_hits", 0):
            return "pids limit reached"
        return ""

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
        """Give a killed cgroup a fresh v2 directory before a process is born in it again, with
        the limits that were written there (a unified host's); v1 directories keep theirs.

        Linux 6.x (seen on 6.18) kills a child that clone3 places (CLONE_INTO_CGROUP) into a cgroup
        that was ever killed through cgroup.kill, so a cgroup is used again only if never killed.
        """
        if self.killed:
            self._rmdir(self.path, time.monotonic() + 5.0)
            self.path.mkdir()
            for file, value in self.settings:
                if file.parent == self.path:
                    file.write_text(value)
            self.killed = False

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left, wait until empty, and remove the directory (and its v1 directories),
        child cgroups first (those of `sandboxd exec` commands)."""
        deadline = time.monotonic() + timeout
        try:
            children = [entry.path for entry in os.scandir(self.path) if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            children = []
        for child in children:
            Cgroup(Path(child)).remove(max(0.0, deadline - time.monotonic()))
        for path in [self.path, *self.v1.values()]:
            self._rmdir(path, deadline)

    def _rmdir(self, path: Path, deadline: float) -> None:
        while True:
            try:
                os.rmdir(path)
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
        self.accounted: set[str] = set()  # of ACCOUNTED, the controllers this host gives every service

    def setup(self) -> list[str]:
        """Make the stack's cgroup; returns warnings for what of ACCOUNTED the host cannot give."""
        try:
            self.instance_path.mkdir(parents=True, exist_ok=True)
        except PermissionError as e:
            raise HostError(f"cannot create {self.instance_path}: {e.strerror}", "run sandboxd as root") from None
        warnings = []
        for controller in ACCOUNTED:
            if self.host.mode is CgroupMode.HYBRID:
                probe = V1_PROBES["memory" if controller == "memory" else "pids"]
                if controller in self.host.v1 and (self.host.v1[controller] / probe).exists():
                    self.accounted.add(controller)
                    continue
                why = f"no v1 {controller} hierarchy"
            elif controller not in self.host.v2_controllers():
                why = f"no {controller} controller in {self.host.v2_mount / self.host.own_v2.lstrip('/')}/cgroup.controllers"
            else:
                try:
                    self._enable_controllers({controller})
                    self.accounted.add(controller)
                    continue
                except HostError as e:
                    why = e.message
            what = "the memory services use is not accounted to each" if controller == "memory" else "services get no default process limit"
            warnings.append(f"{what} ({why})")
        return warnings

    def create(self, name: str, limits: Limits | None = None, parent: Cgroup | None = None) -> Cgroup:
        """A service's cgroup with its limits set (and the default process limit unless it has
        one); on a hybrid host limits go to v1 hierarchies. With `parent`, a per-connection
        instance below its service's cgroup: a memory cgroup of its own, the service's others."""
        from sandboxd.spec.model import Limits

        if limits is None:
            limits = Limits()
        if "pids" in self.accounted and parent is None:
            limits = limits.with_defaults()
        values = limit_values(limits, self.host.mode)
        cg = Cgroup((parent.path if parent else self.instance_path) / name)
        cg.path.mkdir(exist_ok=True)
        self.created.append(cg)
        if self.host.mode is CgroupMode.HYBRID:
            controllers = {LIMIT_FILES[limit][0][0] for limit in values} | (self.accounted & {"memory"})
            if parent is not None:
                cg.joined = {c: path for c, path in parent.v1.items() if c != "memory"}
                controllers &= {"memory"}
            for controller in sorted(controllers):
                base = parent.v1[controller] if parent is not None else self._v1_dir(controller)
                cg.v1[controller] = base / name
                cg.v1[controller].mkdir(exist_ok=True)
        else:
            self._enable_controllers({LIMIT_FILES[limit][1][0] for limit in values})
            if parent is not None:  # the instance gets what its service's siblings get
                self._enable_below(parent.path, set((self.instance_path / "cgroup.subtree_control").read_text().split()))
        try:
            self._write_limits(cg, values)
        except OSError as e:
            raise HostError(f"cannot set the limits of {name}: {e.strerror} ({e.filename})", "check the limits against the host, or use limits_optional: true") from None
        return cg

    def _v1_dir(self, controller: str) -> Path:
        base = self.host.v1[controller] / "sandboxd" / self.instance_path.name
        base.mkdir(parents=True, exist_ok=True)
        return base

    def _write_limits(self, cg: Cgroup, values: dict[str, str]) -> None:
        # Order matters on v1: the memory limit before memsw (which must stay >= it); the CPU period first.
        for limit in ("memory", "swap", "memory_high", "pids", "cpu", "cpu_weight", "io_weight"):
            if limit not in values:
                continue
            v1, v2 = LIMIT_FILES[limit]
            directory = cg.v1[v1[0]] if self.host.mode is CgroupMode.HYBRID else cg.path
            writes = [(directory / (v1[1] if self.host.mode is CgroupMode.HYBRID else v2[1]), values[limit])]
            if limit == "cpu" and self.host.mode is CgroupMode.HYBRID:
                writes.insert(0, (directory / "cpu.cfs_period_us", str(CPU_PERIOD_US)))
            for file, value in writes:
                file.write_text(value)
                cg.settings.append((file, value))

    def _enable_controllers(self, controllers: set[str]) -> None:
        """Unified host: enable controllers in cgroup.subtree_control along sandboxd's own subtree."""
        own = self.host.v2_mount / self.host.own_v2.lstrip("/")
        for directory in (own, self.host.base, self.instance_path):
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
        for controller in self.host.v1:
            remove_empty(self.host.v1[controller] / "sandboxd" / self.instance_path.name)
            remove_empty(self.host.v1[controller] / "sandboxd")


def remove_empty(path: Path) -> None:
    """rmdir a cgroup directory if it is empty; another stack may still use a shared parent."""
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise
