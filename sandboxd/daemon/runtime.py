"""The supervisor's data: a service's state and its runtime record, and the base its parts share."""

from __future__ import annotations

import asyncio
import socket
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.host.cgroups import Cgroup, CgroupManager
from sandboxd.daemon.console import Console
from sandboxd.errors import LaunchError
from sandboxd.sandbox.handle import ForkServer
from sandboxd.daemon.notify import NotifySocket
from sandboxd.plan.launch import LaunchPlan, UserNamespace
from sandboxd.daemon.restart import Outcome, StartLimiter
from sandboxd.host.sockets import BoundSocket
from sandboxd.spec.model import Limits, Service, Stack
from sandboxd.host.state import StateRecord

if TYPE_CHECKING:
    from sandboxd.host.network import Namespaces


class State(Enum):
    STOPPED = "stopped"
    WAITING = "waiting"  # for a connection: on-demand, or one sandbox per connection
    STARTING = "starting"
    RUNNING = "running"
    READY = "ready"
    RELOADING = "reloading"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"


FINAL = (State.STOPPED, State.EXITED, State.FAILED)
FDSTORE_POLL = 1.0  # seconds between checks of the fd store for hung-up descriptors
HEALTH_FIRST_CHECK = 0.05  # until a service is ready, its health check runs this soon and then every 0.1 s
ALIVE = (State.STARTING, State.RUNNING, State.READY, State.RELOADING)


@dataclass
class ServiceRuntime:
    spec: Service
    plan: LaunchPlan
    cgroup: Cgroup
    output_r: int
    output_w: int
    state: State = State.STOPPED
    launch_id: int = 0
    pid: int = 0
    pidfd: int = -1
    channel: socket.socket | None = None
    launch_error: LaunchError | None = None
    requested_ns: int = 0
    exec_ns: int = 0
    started_at: float = 0.0
    restarts: int = 0
    limiter: StartLimiter | None = None
    notify: NotifySocket | None = None
    status_text: str = ""
    errno: int = 0
    main_pid: int = 0
    kill_reason: tuple[Outcome, str] | None = None
    start_timer: asyncio.TimerHandle | None = None
    watchdog_timer: asyncio.TimerHandle | None = None
    watching: bool = False
    idle_stopping: bool = False
    idle_timer: asyncio.TimerHandle | None = None
    last_activity: float = 0.0
    last_usage: int = -1
    instances: int = 0
    instance_counter: int = 0
    fdstore: list[StoredFd] = field(default_factory=list)
    fdstore_timer: asyncio.TimerHandle | None = None
    health_timer: asyncio.TimerHandle | None = None
    health_failures: int = 0
    health_running: bool = False
    bind_listener: int = -1  # seccomp listener of the sandbox's bind() calls (proxy handoff)
    sources: dict[str, int] = field(default_factory=dict)  # held bind sources by the plan's source path (pins.py)
    handed_off: set[str] = field(default_factory=set)  # proxy sockets the program was given itself

    @property
    def per_connection(self) -> bool:
        return self.plan.per_connection
    partial: bytes = b""
    timer: asyncio.TimerHandle | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class StoredFd:
    """A descriptor a service gave sandboxd to keep (FDSTORE=1), handed back at its next start."""

    name: str
    fd: int
    poll: bool  # dropped when it reports hang-up or error (unless FDPOLL=0)


@dataclass
class Instance:
    """One sandbox of a per-connection service, serving one accepted connection."""

    rt: ServiceRuntime
    name: str
    cgroup: Cgroup
    channel: socket.socket | None = None
    pidfd: int = -1



class SupervisorBase:
    """What the parts of the supervisor share: its state, and the core operations each part calls.

    The supervisor is split by job (readiness.py, activation.py, operations.py, supervisor.py);
    each part is a mixin on this base, and Supervisor puts them together. The methods below are
    implemented by one of the parts; they are declared here so that every part can call them.
    """

    stack: Stack
    plans: dict[str, LaunchPlan]
    instance: str
    runtime_dir: Path
    root_dir: Path
    record: StateRecord | None
    console: Console
    fork_server: ForkServer | None
    sockets: dict[tuple[str, int], BoundSocket]
    services: dict[str, ServiceRuntime]
    by_launch: dict[int, ServiceRuntime]
    instances: dict[int, Instance]
    commands: dict[int, asyncio.Future[int]]
    proxy_tasks: set[asyncio.Future[None]]
    no_instances: asyncio.Event
    stop_requested: asyncio.Event | None
    stopping: bool
    detached: bool
    started_wall: float
    namespaces: Namespaces | None
    cgroups: CgroupManager
    limits: dict[str, Limits]
    exec_count: int  # `sandboxd exec` commands so far: each gets a cgroup sbd-exec-N of its own
    pinned: dict[str, dict[str, int]]  # bind sources opened at validation, until their service's runtime takes them

    def _launch(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _stack_userns(self, stack: Stack) -> UserNamespace | None:
        raise NotImplementedError

    def _transition(self, rt: ServiceRuntime, new: State, reason: str) -> None:
        raise NotImplementedError

    def _check_done(self) -> None:
        raise NotImplementedError

    async def _stop(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _begin_stop(self, rt: ServiceRuntime, reason: str) -> None:
        raise NotImplementedError

    def _signal_init(self, rt: ServiceRuntime, sig: int) -> None:
        raise NotImplementedError

    def _disarm_timers(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _watch(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _unwatch(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _wait_for_connection(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _kill_for(self, rt: ServiceRuntime, outcome: Outcome, why: str, sig: int) -> None:
        raise NotImplementedError

    def _add_runtime(self, service: Service) -> ServiceRuntime:
        raise NotImplementedError

    def _drop_runtime(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _pin_own(self, rt: ServiceRuntime, paths: set[str] | None = None) -> None:
        raise NotImplementedError

    def _source_fds(self, rt: ServiceRuntime) -> list[int]:
        raise NotImplementedError

    def _inside(self, service: str | None) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _on_output(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _on_notify(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    def _arm_idle_check(self, rt: ServiceRuntime) -> None:
        raise NotImplementedError

    async def _run_inside(self, rt: ServiceRuntime, argv: list[str], timeout: float, output_fd: int = -1) -> int | None:
        raise NotImplementedError


def command_env(rt: ServiceRuntime) -> dict[str, str]:
    """The environment of a command run inside a service's sandbox: the service's, without what
    belongs to the service's own process (its descriptors, notify socket, watchdog)."""
    return {k: v for k, v in rt.plan.env if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
