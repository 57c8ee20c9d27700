"""Turn a validated stack into launch plans: the exact steps that make each sandbox.

A plan is plain data. It says which namespaces to create, which mounts to make inside the new
root (in order), which descriptors the service gets and under which names, and the exact
environment. `plan_stack` is pure apart from asking `exists` whether a mount target is present in
the image, so it is unit-tested without root; the launcher only walks the list.

Descriptor order (documented in the README): the socket units feeding a service, sorted by unit
name, and within one unit its `listen` entries in the order written. Fds start at 3.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import SpecError, SpecErrors
from .linux import CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUTS
from .spec import Service, Stack

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The service is the first child of the init (pid 1) in a fresh pid namespace, so it is pid 2.
SERVICE_PID_IN_SANDBOX = 2

# Directories that are a fresh tmpfs in every sandbox: mount targets below them need not exist.
TMPFS_DIRS = ("/tmp", "/run")
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")

MountKind = Literal["rbind-root", "proc", "tmpfs", "dev", "bind"]


@dataclass(frozen=True)
class MountOp:
    """One mount inside the new root. `target` is the path as the service will see it."""

    kind: MountKind
    target: str
    source: str = ""
    readonly: bool = True
    options: str = ""


@dataclass(frozen=True)
class LaunchPlan:
    service: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    hostname: str
    workdir: str
    clone_flags: int
    mounts: tuple[MountOp, ...]
    fd_names: tuple[str, ...]
    fd_sockets: tuple[tuple[str, int], ...] = field(default=())  # (socket unit, listen index) per fd

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_wire(data: dict[str, Any]) -> LaunchPlan:
        return LaunchPlan(
            service=data["service"],
            argv=tuple(data["argv"]),
            env=tuple((k, v) for k, v in data["env"]),
            hostname=data["hostname"],
            workdir=data["workdir"],
            clone_flags=data["clone_flags"],
            mounts=tuple(MountOp(**m) for m in data["mounts"]),
            fd_names=tuple(data["fd_names"]),
            fd_sockets=tuple((s, i) for s, i in data["fd_sockets"]),
        )


@dataclass(frozen=True)
class HostFacts:
    init_path: str  # the small init that runs as pid 1 of each sandbox (dumb-init)


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _base_mounts() -> list[MountOp]:
    return [
        MountOp("rbind-root", "/", "/", readonly=True),
        MountOp("proc", "/proc"),
        MountOp("dev", "/dev"),
        MountOp("tmpfs", "/tmp", options="mode=1777"),
        MountOp("tmpfs", "/run", options="mode=0755"),
    ]


def _mount_target_errors(service: Service, target: str, line: int, key: str, exists: Callable[[str], bool]) -> list[SpecError]:
    if any(_under(target, d) for d in TMPFS_DIRS) or exists(target):
        return []
    if target in ("/", "/proc", "/dev") or _under(target, "/proc") or _under(target, "/dev"):
        return [SpecError(service.file, line, key, f"cannot mount over {target}: sandboxd manages it")]
    return [
        SpecError(
            service.file,
            line,
            key,
            f"{target} does not exist in the image and the root is read-only; "
            "use an existing path or one under /tmp or /run",
        )
    ]


def plan_service(stack: Stack, service: Service, facts: HostFacts, exists: Callable[[str], bool] = os.path.lexists) -> LaunchPlan:
    errors: list[SpecError] = []
    mounts = _base_mounts()
    user_mounts: list[MountOp] = []
    for index, m in enumerate(service.mounts):
        errors += _mount_target_errors(service, m.target, m.line, f"mounts[{index}].target", exists)
        user_mounts.append(MountOp("bind", m.target, str(m.source), readonly=m.readonly))
    for name in service.uses:
        for address in next(s for s in stack.sockets if s.name == name).listen:
            if address.path and not address.is_abstract:
                target = posixpath.normpath(address.path)
                errors += _mount_target_errors(service, target, service.line, "uses", exists)
                user_mounts.append(MountOp("bind", target, address.path, readonly=False))
    if errors:
        raise SpecErrors(errors)
    # Parents before children, so a bind below another bind lands on top of it.
    mounts += sorted(user_mounts, key=lambda m: m.target.count("/"))

    fd_names: list[str] = []
    fd_sockets: list[tuple[str, int]] = []
    for sock in stack.sockets_of(service.name):
        for index, _ in enumerate(sock.listen):
            fd_names.append(sock.fdname)
            fd_sockets.append((sock.name, index))

    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    env.update(dict(service.environment))
    if fd_names:
        env["LISTEN_FDS"] = str(len(fd_names))
        env["LISTEN_PID"] = str(SERVICE_PID_IN_SANDBOX)
        env["LISTEN_FDNAMES"] = ":".join(fd_names)

    return LaunchPlan(
        service=service.name,
        # "--" ends dumb-init's own options, so a command may start with "-".
        argv=(facts.init_path, "--", *service.command),
        env=tuple(env.items()),
        hostname=service.hostname,
        workdir=service.workdir,
        clone_flags=CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET,
        mounts=tuple(mounts),
        fd_names=tuple(fd_names),
        fd_sockets=tuple(fd_sockets),
    )


def plan_stack(stack: Stack, facts: HostFacts, exists: Callable[[str], bool] = os.path.lexists) -> dict[str, LaunchPlan]:
    """Plan every service; all problems of all services are reported together."""
    plans: dict[str, LaunchPlan] = {}
    errors: list[SpecError] = []
    for service in stack.services:
        try:
            plans[service.name] = plan_service(stack, service, facts, exists)
        except SpecErrors as e:
            errors += e.errors
    if errors:
        raise SpecErrors(errors)
    return plans


def init_path() -> str:
    """Where dumb-init lives: beside the Python that runs sandboxd (its wheel installs it there)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "dumb-init"
    if beside.exists():
        return str(beside)
    found = shutil.which("dumb-init")
    if found:
        return found
    from .errors import HostError

    raise HostError("dumb-init, the init sandboxd runs as pid 1 of each sandbox, is not installed", "pip install dumb-init")
