"""One service's cgroup: what the supervisor asks of it while the service runs.

A `Cgroup` is its cgroup2 directory, where its processes are born (clone3 with
CLONE_INTO_CGROUP) and tracked, and on a hybrid host the v1 directories its limits are in: its
own, and for a per-connection instance those of its service that it joins. Which of those exist
is the manager's choice (unified.py, hybrid.py); a `Cgroup` only reads what is there, so nothing
here depends on the host's mode.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from pathlib import Path

from sandboxd.host.cgroups.hierarchy import kill_supported


class Cgroup:
    """One service's cgroup: a v2 directory, and on a hybrid host its v1 directories (its own, and
    for a per-connection instance those of its service that it joins)."""

    def __init__(self, path: Path, v1: dict[str, Path] | None = None, joined: dict[str, Path] | None = None, can_kill: bool | None = None) -> None:
        self.path = path
        self.v1 = v1 or {}  # controller -> a v1 directory of its own
        self.joined = joined or {}  # controller -> its service's v1 directory (not removed with it)
        self.can_kill = kill_supported() if can_kill is None else can_kill  # cgroup.kill exists (CgroupHost.kill)
        self.killed = False
        self.baseline: dict[str, int] = {}
        self.settings: list[tuple[Path, str]] = []  # the limit files written, in order
        self.unused = False  # made just now (CgroupManager.create), no process has been in it

    @property
    def v1_tasks_files(self) -> tuple[str, ...]:
        """How a process joins this cgroup besides being born in its v2 directory: the `tasks`
        files of its v1 hierarchies (a hybrid host), to each of which the child, still one thread,
        writes "0". That moves the writer alone, which the kernel does without taking the global
        threadgroup lock that a write to cgroup.procs (or of another pid) takes, and so without
        waiting for an RCU grace period (what that did to a launch: README, Performance)."""
        return tuple(str(path / "tasks") for path in [*self.v1.values(), *self.joined.values()])

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
        if self.unused:  # a cgroup just made has counted nothing: no files to read at the first launch
            self.baseline, self.unused = {"oom_kills": 0, "pids_limit_hits": 0}, False
            return
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

    def io_bytes(self) -> tuple[int, int] | None:
        """Bytes read and written so far: from cgroup2's io.stat (io controller on), else from the
        v1 blkio directory of its own (a hybrid host, with an I/O limit), else the sum of its live
        processes' /proc/PID/io (what the dead ones did is then not counted); None if none is readable."""
        try:
            lines = (self.path / "io.stat").read_text().splitlines()
            fields = [dict(f.split("=", 1) for f in line.split()[1:] if "=" in f) for line in lines]
            return sum(int(f.get("rbytes", 0)) for f in fields), sum(int(f.get("wbytes", 0)) for f in fields)
        except (OSError, ValueError):
            pass
        if "blkio" in self.v1:
            try:
                text = (self.v1["blkio"] / "blkio.throttle.io_service_bytes").read_text()
            except OSError:
                return None
            rows = [line.split() for line in text.splitlines()]
            return (sum(int(r[2]) for r in rows if len(r) == 3 and r[1] == "Read"),
                    sum(int(r[2]) for r in rows if len(r) == 3 and r[1] == "Write"))
        return self._process_io()

    def _process_io(self) -> tuple[int, int] | None:
        """read_bytes and write_bytes of /proc/PID/io, summed over the cgroup's processes."""
        read = written = 0
        found = False
        for pid in self.pids():
            try:
                fields = dict(line.split(": ", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines())
                read, written, found = read + int(fields["read_bytes"]), written + int(fields["write_bytes"]), True
            except (OSError, ValueError, KeyError):
                continue
        return (read, written) if found else None

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
        if self.can_kill:
            try:
                (self.path / "cgroup.kill").write_text("1")
            except FileNotFoundError:
                pass  # removed already
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
        if self._rmdir_at_once():
            return
        deadline = time.monotonic() + timeout
        try:
            children = [entry.path for entry in os.scandir(self.path) if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            children = []
        for child in children:
            Cgroup(Path(child), can_kill=self.can_kill).remove(max(0.0, deadline - time.monotonic()))
        for path in [self.path, *self.v1.values()]:
            self._rmdir(path, deadline)

    def _rmdir_at_once(self) -> bool:
        """Remove the cgroup at the first try: true if it was empty (no process, no child cgroup),
        as a per-connection instance whose init has exited is, and then so are its v1 directories.
        One rmdir each instead of reading cgroup.events and listing the directory first; what
        is left otherwise (EBUSY) is for `remove` to kill and wait for."""
        return all(_rmdir_if_empty(path) for path in [self.path, *self.v1.values()])

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


def _rmdir_if_empty(path: Path) -> bool:
    """rmdir a cgroup directory: false if it is in use still (processes or child cgroups)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True


def remove_empty(path: Path) -> None:
    """rmdir a cgroup directory if it is empty; another stack may still use a shared parent."""
    try:
        os.rmdir(path)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise
