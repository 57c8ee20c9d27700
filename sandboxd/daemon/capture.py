"""The running supervisor's state as an upgrade's record (record.py): each service's runtime,
each per-connection sandbox, the stack's descriptors, each named by number and what it is.
Called once the stack has settled (upgrade.py), in one callback of the loop."""

from __future__ import annotations

import base64
import os
import stat
from typing import TYPE_CHECKING, Protocol

from sandboxd import __version__
from sandboxd.daemon.record import FORMAT, Descriptor, InstanceRecord, Kind, LaunchRecord, ServiceRecord, SocketRecord, StackRecord, StoredFdRecord, pack_spec
from sandboxd.daemon.runtime import ServiceRuntime

if TYPE_CHECKING:
    from sandboxd.daemon.activation import Activation
    from sandboxd.daemon.control import ControlServer
    from sandboxd.daemon.console import Console
    from sandboxd.daemon.forks import ForkServerLink
    from sandboxd.daemon.health import HealthChecks
    from sandboxd.daemon.operations import Operations
    from sandboxd.daemon.output import Output
    from sandboxd.daemon.proxy import Proxies
    from sandboxd.daemon.resources import StackResources
    from sandboxd.daemon.runtime import RunningStack


class Upgradable(Protocol):
    """What an upgrade reads of the supervisor (supervisor.py)."""

    running: RunningStack
    resources: StackResources
    link: ForkServerLink
    activation: Activation
    health: HealthChecks
    proxies: Proxies
    output: Output
    console: Console
    operations: Operations
    control: ControlServer | None
    detached: bool


def kind_of(fd: int) -> Kind:
    """What an open descriptor is, as the record names it."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISREG(mode):
        return "file"
    link = os.readlink(f"/proc/self/fd/{fd}")
    if link.startswith("net:"):
        return "netns"
    return "pidfd" if link == "anon_inode:[pidfd]" else "anon"


class _Named:
    def __init__(self) -> None:
        self.descriptors: list[Descriptor] = []

    def __call__(self, fd: int, what: str) -> int:
        if fd >= 0:
            self.descriptors.append(Descriptor(fd, what, kind_of(fd)))
        return fd


def capture(sup: Upgradable, token: str, upgrades: int, record_format: int | None = None) -> StackRecord:
    """The record of the settled stack. `record_format` (tests only, `sandboxd upgrade
    --test-record-format N`) writes another format number, which the new code must refuse."""
    running, resources, named = sup.running, sup.resources, _Named()
    assert sup.link.server is not None and sup.control is not None and resources.record is not None
    state = resources.record
    ids = resources.ids
    specs = {name: rt.spec for name, rt in running.services.items()}  # as a service changed its own (WATCHDOG_USEC=)
    spec = pack_spec((running.stack, running.plans, running.limits, running.networks, ids.userns if ids is not None else None, specs))
    namespaces = running.namespaces.fds if running.namespaces is not None else {}
    services = tuple(_service(rt, named, sup.proxies.started.get(rt.name, {})) for rt in running.services.values())
    instances = tuple(
        InstanceRecord(request_id, i.rt.name, i.name, named(i.pidfd, f"{i.name}: pidfd"), i.state.value) for request_id, i in sup.activation.instances.items()
    )
    return StackRecord(
        format=FORMAT if record_format is None else record_format,
        version=__version__,
        upgrades=upgrades,
        token=token,
        instance=running.instance,
        runtime_dir=str(running.runtime_dir),
        detached=sup.detached,
        pid=os.getpid(),
        fork_server_pid=sup.link.server.pid,
        fork_server_fd=named(sup.link.server.conn.fileno(), "fork server link"),
        last_request_id=sup.link.next_id,
        control_fd=named(sup.control.listening_fd(), "control socket"),
        lease_fd=named(ids.fd if ids is not None else -1, "subordinate ids' lock"),
        state_cgroups=tuple(state.cgroups),
        state_files=tuple(state.files),
        state_dirs=tuple(state.dirs),
        state_subnets=tuple(state.subnets),
        state_userns=tuple(state.userns.items()),
        netns=tuple((key, named(fd, f"network namespace {key}")) for key, fd in namespaces.items()),
        sockets=tuple(SocketRecord(u, i, named(b.sock.fileno(), f"socket {u}[{i}]")) for (u, i), b in running.sockets.items()),
        services=services,
        instances=instances,
        started_wall=sup.operations.started_wall,
        exec_count=sup.operations.exec_count,
        spec=spec,
        descriptors=tuple(named.descriptors),
    )


def _service(rt: ServiceRuntime, named: _Named, proxies: dict[str, int]) -> ServiceRecord:
    launch, name = rt.launch, rt.name
    ended = launch.exit
    timer = rt.restarts.timer
    return ServiceRecord(
        name=name,
        state=rt.state.value,
        reason=rt.reason,
        was_ready=rt.was_ready,
        launch=LaunchRecord(
            launch.id, launch.pid, named(launch.pidfd, f"{name}: pidfd"), launch.started_at, launch.requested_ns, launch.exec_ns,
            ended.code if ended else None, ended.signal if ended else None,
        ),  # fmt: skip
        restarts=rt.restarts.count,
        starts=tuple(rt.restarts.limiter.starts),
        restart_at=timer.when() if timer is not None and not timer.cancelled() else None,
        output_r=named(rt.output.r, f"{name}: output pipe (read end)"),
        output_w=named(rt.output.w, f"{name}: output pipe (write end)"),
        partial=base64.b64encode(rt.output.partial).decode(),
        notify_fd=named(rt.notify.socket.sock.fileno(), f"{name}: notify socket") if rt.notify.socket is not None else -1,
        status_text=rt.notify.status_text,
        main_pid=rt.notify.main_pid,
        listener=named(rt.handoff.listener, f"{name}: bind() listener"),
        handed_off=tuple(sorted(rt.handoff.handed_off)),
        fdstore=tuple(StoredFdRecord(s.name, named(s.fd, f"{name}: fd store {s.name}"), s.poll) for s in rt.fdstore),
        sources=tuple((path, named(fd, f"{name}: bind source {path}")) for path, fd in rt.sources.items()),
        baseline=tuple(rt.cgroup.baseline.items()),
        connections=rt.connections.counter,
        active=rt.connections.active,
        proxies=tuple(sorted(proxies.items())),
    )
