"""Integration tests start real sandboxes as root.

Every test gets its own spec folder and socket folder, and afterwards an autouse fixture fails
the test if anything of sandboxd's is left on the machine: a cgroup, a mount, a runtime or netns
file, an `sbd` link, a socket file, or a process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from sandboxd.host.cgroups import HybridCgroups, detect, v1_mounts

# This host's cgroups as sandboxd finds them: a stack a test starts runs in this process's cgroup.
CGROUPS = detect()
CGROUP_BASE = CGROUPS.base
RUNTIME = Path("/run/sandboxd")
# Seconds after which a wait for an event (a line, an exit, a state) gives up and fails. Only a
# hang ever reaches it: every wait ends as soon as its event happens, so on any machine, however
# slow or busy, the outcome is decided by events, never by this bound.
HANG = 60.0
T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout: float = HANG) -> T:
    """The first true value of `condition()`, asked again until it comes. Fails, naming `what` it
    waited for, only if it never comes (a hang)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout:g} s for {what}")
        time.sleep(0.02)
    return value


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    for item in items:
        if "integration" in str(item.fspath):
            if os.environ.get("CI"):
                item.add_marker(pytest.mark.xfail(reason="CI must run integration tests as root", strict=True, run=False))
            else:
                item.add_marker(pytest.mark.skip(reason="integration tests need root"))


def _child_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cgroup_dir(*names: str, controller: str = "", stack: str = "stack") -> Path:
    """Where sandboxd puts the cgroup of `names` (a service, then a per-connection instance of it)
    of `stack`: its cgroup2 directory, or with `controller` its v1 directory (a hybrid host)."""
    top = CGROUPS.v1_stack_dir(controller, stack) if controller else CGROUPS.stack_dir(stack)
    return top.joinpath(*names)


def _pids_in_sandboxd_cgroups() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if "/sandboxd/" in (entry / "cgroup").read_text():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def leftovers(socket_dir: Path | None = None) -> list[str]:
    found: list[str] = []
    mounts = v1_mounts()
    for controller in sorted({controller for controller, _file in HybridCgroups.FILES.values()} & set(mounts)):
        found += [f"v1 cgroup {p}" for p in mounts[controller].glob("**/sandboxd") if p.is_dir()]
    if CGROUP_BASE.exists():
        found += [f"cgroup {p}" for p in CGROUP_BASE.rglob("*") if p.is_dir()] or [f"cgroup {CGROUP_BASE}"]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if "sandboxd" in line or " sbd" in line:
            found.append(f"mount {line}")
    if RUNTIME.exists():
        found.append(f"runtime dir {RUNTIME}: {sorted(p.name for p in RUNTIME.iterdir())}")
    found += [f"netns {p}" for p in Path("/run/netns").glob("sbd*")] if Path("/run/netns").exists() else []
    found += [f"link {p.name}" for p in Path("/sys/class/net").iterdir() if p.name.startswith("sbd")]
    if socket_dir is not None and socket_dir.exists():
        found += [f"socket file {p}" for p in socket_dir.rglob("*") if p.is_socket()]
    found += [f"process {pid} in a sandboxd cgroup" for pid in _pids_in_sandboxd_cgroups()]
    found += [f"child process {pid}" for pid in _child_pids(os.getpid())]
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind(socket_dir: Path) -> Iterator[None]:
    before = leftovers()
    assert not before, f"the machine was not clean before the test: {before}"
    yield
    # Objects go away a moment after sandboxd exits (a killed process is reaped, a cgroup emptied):
    # wait for that; the bound only ends a wait that would never end.
    deadline = time.monotonic() + HANG
    while (found := leftovers(socket_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not found, f"left behind: {found}"


@pytest.fixture
def socket_dir(tmp_path: Path) -> Path:
    path = tmp_path / "sockets"
    path.mkdir()
    return path


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    path = tmp_path / "stack"
    path.mkdir()
    return path


class Stack:
    """`sandboxd up DIR` running as a subprocess, its output collected."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.folder = folder
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "up", str(folder), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"},
        )
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        os.set_blocking(self.proc.stderr.fileno(), False)  # type: ignore[union-attr]
        self._out = ""
        self._err = ""

    @property
    def out(self) -> str:
        """Everything the services printed so far (read afresh on every access)."""
        self._read()
        return self._out

    @property
    def err(self) -> str:
        """Everything sandboxd itself said so far."""
        self._read()
        return self._err

    def _read(self) -> None:
        for stream, attr in ((self.proc.stdout, "_out"), (self.proc.stderr, "_err")):
            assert stream is not None
            if stream.closed:
                continue
            data = stream.read()
            if data:
                setattr(self, attr, getattr(self, attr) + data.decode(errors="replace"))

    def wait_for(self, text: str, stream: str = "any", timeout: float = HANG) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read()
            haystack = {"out": self.out, "err": self.err}.get(stream, self.out + self.err)
            if text in haystack:
                return haystack
            if self.proc.poll() is not None:
                self._read()
                raise AssertionError(f"sandboxd exited ({self.proc.returncode}) before {text!r}:\n{self.out}\n{self.err}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {text!r}:\nstdout:\n{self.out}\nstderr:\n{self.err}")

    def wait_up(self) -> None:
        self.wait_for(" launched in ", "err")

    def lines(self, service: str) -> list[str]:
        self._read()
        prefix = f"{service} "
        return [line.split("| ", 1)[1] for line in self.out.splitlines() if line.startswith(prefix) and "| " in line]

    def wait_lines(self, service: str, count: int, timeout: float = HANG) -> list[str]:
        """The service's output once it has printed at least `count` lines."""
        deadline = time.monotonic() + timeout
        while len(lines := self.lines(service)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return lines

    def stop(self, sig: int = signal.SIGINT, timeout: float = HANG) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._read()
        return self.proc.returncode

    def wait_exit(self, timeout: float = HANG) -> int:
        self.proc.wait(timeout)
        self._read()
        return self.proc.returncode


@pytest.fixture
def run_stack() -> Iterator[object]:
    started: list[Stack] = []

    def start(folder: Path, *args: str) -> Stack:
        stack = Stack(folder, *args)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        if stack.proc.poll() is None:
            stack.stop()


def stored_ids() -> tuple[int, int]:
    """The host uid and gid that root inside a sandbox's user namespace is, on the disk of a volume
    or a bind (the first block of the sandboxd user's range, see sandboxd/subids.py)."""
    from sandboxd.host.subids import ensure_blocks

    return ensure_blocks().store


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path
