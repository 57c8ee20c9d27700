"""The supervisor's data: what it shares of the running stack, and each service's runtime record,
grouped by the collaborator that keeps each part (the state itself changes only through machine.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.daemon.notify import NotifySocket
from sandboxd.daemon.restart import Outcome, StartLimiter
from sandboxd.daemon.states import INSTANCE_LIFE, InstanceEvent, InstanceState, State
from sandboxd.errors import LaunchError
from sandboxd.host.cgroups import Cgroup
from sandboxd.host.paths import sandbox_root
from sandboxd.host.pins import SourceFds, close_all
from sandboxd.host.sockets import BoundSocket
from sandboxd.plan.launch import LaunchPlan, NetworkPlan
from sandboxd.spec.model import Limits, Service, Socket, Stack

if TYPE_CHECKING:
    from sandboxd.host.network import Namespaces

SocketKey = tuple[str, int]  # (socket unit, index of its listen entry)
FDSTORE_POLL = 1.0  # seconds between checks of the fd store for hung-up descriptors
HEALTH_FIRST_CHECK = 0.05  # until a service is ready, its health check runs this soon and then every 0.1 s


@dataclass
class RunningStack:
    """What the collaborators share of the running stack. A reload replaces `stack`, `plans` and
    `limits` and changes `services` and `sockets` in place."""

    stack: Stack
    plans: dict[str, LaunchPlan]
    limits: dict[str, Limits]
    pinned: dict[str, SourceFds]  # bind sources opened at validation, until their service's runtime takes them
    instance: str
    runtime_dir: Path
    services: dict[str, ServiceRuntime] = field(default_factory=dict)
    sockets: dict[SocketKey, BoundSocket] = field(default_factory=dict)
    namespaces: Namespaces | None = None
    networks: tuple[NetworkPlan, ...] = ()
    stopping: bool = False  # the stack is going down: nothing starts any more

    @property
    def root_dir(self) -> Path:
        return sandbox_root(self.runtime_dir)

    def socket_unit(self, name: str) -> Socket:
        return self.stack.socket(name)

    def netns_fd(self, rt: ServiceRuntime) -> int:
        """The network namespace a service's sandbox joins, or -1 when it makes its own."""
        return self.namespaces.fds[rt.spec.name] if rt.plan.net == "join" and self.namespaces else -1

    def inside(self, service: str | None) -> AbstractContextManager[None]:
        """Run the block in a service's network namespace (made before the service), or where we are."""
        if service is None or self.namespaces is None:
            return nullcontext()
        return self.namespaces.inside(service)


@dataclass(frozen=True)
class Verdict:
    """Why sandboxd kills a running service, and how its exit is then judged."""

    outcome: Outcome
    why: str
    signal: int


@dataclass(frozen=True)
class ExitStatus:
    """How a sandbox's init ended, as numbers a script reads (`sandboxd ps --json`): its exit code,
    or the name of the signal that killed it (restart.py's `exit_details`)."""

    code: int | None
    signal: str | None


@dataclass
class Launch:
    """The service's current sandbox: one launch, from the request to the exit (lifecycle.py)."""

    id: int = 0  # the fork server's request id
    pid: int = 0  # the sandbox init's pid in the host's pid namespace
    pidfd: int = -1
    channel: socket.socket | None = None  # the status channel, until the child execs
    error: LaunchError | None = None
    requested_ns: int = 0
    exec_ns: int = 0
    started_at: float = 0.0  # when it began to run (monotonic)
    verdict: Verdict | None = None  # set when sandboxd kills it for a failure (stopping.py)
    kill_timer: asyncio.TimerHandle | None = None  # SIGKILL to its cgroup after stop_timeout
    exit: ExitStatus | None = None  # set where its exit is judged (lifecycle.py); None if it could not start


@dataclass
class Restarts:
    """How often it was restarted, its start limit, and the delay before the next start."""

    limiter: StartLimiter
    count: int = 0
    timer: asyncio.TimerHandle | None = None

    def reason(self) -> str:
        return "start" if self.count == 0 else f"restart #{self.count}"


@dataclass
class Notified:
    """What the service said through sd_notify (readiness.py)."""

    socket: NotifySocket | None = None
    status_text: str = ""
    errno: int = 0
    main_pid: int = 0
    held: bool = False  # its socket is not read while the launch is not known to have run (readiness.py)


@dataclass
class Timers:
    """What is armed while its sandbox runs; all cancelled when it stops, is killed or exits."""

    start: asyncio.TimerHandle | None = None  # start_timeout
    watchdog: asyncio.TimerHandle | None = None
    idle: asyncio.TimerHandle | None = None
    health: asyncio.TimerHandle | None = None

    def disarm(self) -> None:
        for timer in (self.start, self.watchdog, self.idle, self.health):
            if timer is not None:
                timer.cancel()
        self.start = self.watchdog = self.idle = self.health = None


@dataclass
class HealthProbe:
    failures: int = 0
    probe: asyncio.Future[None] | None = None  # the check in flight (one at a time)


@dataclass
class IdleWatch:
    last_activity: float = 0.0
    last_usage: int = -1


@dataclass
class Connections:
    """A per-connection service's instances (activation.py)."""

    active: int = 0
    counter: int = 0


@dataclass
class Handoff:
    """The sandbox's bind() calls, watched for a proxy's address (handoff.py)."""

    listener: int = -1  # seccomp listener of the sandbox's bind() calls
    handed_off: set[str] = field(default_factory=set)  # proxy sockets the program was given itself


@dataclass
class OutputPipe:
    r: int
    w: int
    partial: bytes = b""  # the start of a line not ended yet


@dataclass
class StoredFd:
    """A descriptor a service gave sandboxd to keep (FDSTORE=1), handed back at its next start."""

    name: str
    fd: int
    poll: bool  # dropped when it reports hang-up or error (unless FDPOLL=0)


@dataclass
class ServiceRuntime:
    spec: Service
    plan: LaunchPlan
    cgroup: Cgroup
    output: OutputPipe
    state: State = State.STOPPED
    reason: str = ""  # why it is in its state: the reason of the transition into it (machine.py)
    was_ready: bool = False  # it was ready once (or, with ready: started, running) since the stack began
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set once it runs, or will not
    launch: Launch = field(default_factory=Launch)
    restarts: Restarts = field(init=False)
    notify: Notified = field(default_factory=Notified)
    timers: Timers = field(default_factory=Timers)
    health: HealthProbe = field(default_factory=HealthProbe)
    idle: IdleWatch = field(default_factory=IdleWatch)
    connections: Connections = field(default_factory=Connections)
    handoff: Handoff = field(default_factory=Handoff)
    fdstore: list[StoredFd] = field(default_factory=list)
    fdstore_timer: asyncio.TimerHandle | None = None
    sources: dict[str, int] = field(default_factory=dict)  # held bind sources by the plan's source path (pins.py)

    def __post_init__(self) -> None:
        self.restarts = Restarts(StartLimiter(self.spec))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def per_connection(self) -> bool:
        return self.plan.per_connection

    def source_fds(self) -> list[int]:
        """The held source of each bind mount of the service, in the order of its plan."""
        return [self.sources[op.source] for op in self.plan.mounts if op.kind == "bind"]

    def close(self) -> None:
        """Close every descriptor the record holds (the service's sandbox is gone)."""
        for fd in (self.output.r, self.output.w, self.launch.pidfd, self.handoff.listener):
            if fd >= 0:
                os.close(fd)
        self.output.r = self.output.w = self.launch.pidfd = self.handoff.listener = -1
        if self.launch.channel is not None:
            self.launch.channel.close()
            self.launch.channel = None
        close_all(self.sources)
        if self.notify.socket is not None:
            self.notify.socket.close()
        for stored in self.fdstore:
            os.close(stored.fd)
        self.fdstore.clear()


@dataclass
class Instance:
    """One sandbox of a per-connection service, serving one accepted connection."""

    rt: ServiceRuntime
    name: str
    cgroup: Cgroup
    channel: socket.socket | None = None
    pidfd: int = -1
    state: InstanceState = InstanceState.STARTING

    def allows(self, event: InstanceEvent) -> bool:
        return INSTANCE_LIFE.allows(self.state, event)

    def transition(self, event: InstanceEvent) -> None:
        """Move along INSTANCE_LIFE (TransitionRefused for a pair it does not have). Not logged: a
        line per connection would drown the log; what went wrong is said where it is seen."""
        self.state = INSTANCE_LIFE.step(self.state, event).next


def command_env(rt: ServiceRuntime) -> dict[str, str]:
    """The environment of a command run inside a service's sandbox: the service's, without what
    belongs to the service's own process (its descriptors, notify socket, watchdog)."""
    return {k: v for k, v in rt.plan.env if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
