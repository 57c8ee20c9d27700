"""The supervisor: binds the sockets, launches every sandbox at once, restarts, stops, cleans up.

One asyncio loop, no threads. Each service's life is the table below; every transition is
logged once with its reason.

    state      event                      next       action
    ─────────  ─────────────────────────  ─────────  ──────────────────────────────────────────
    stopped    start                      starting   ask the fork server for a sandbox
    starting   child about to exec        running    remember its host pid (and a pidfd);
                                                     with `ready: notify` arm start_timeout
    starting   set-up failed / exited     backoff    or failed/exited, per restart.py
    stopped    on-demand / accept         waiting    watch its sockets
    waiting    a connection arrives       starting   (on-demand) / a new instance (accept: true)
    running    READY=1                    ready      (only with `ready: notify`)
    running    idle for idle_stop         stopping   then waiting again (scale to zero)
    ready      RELOADING=1 / READY=1      reloading / ready
    running    start_timeout / watchdog   (same)     stop it; its exit counts as timeout/watchdog
    running,   exited                     backoff    or failed/exited, per restart.py;
    ready                                            start_limit exceeded: failed for good
    backoff    delay elapsed              starting   the same sockets, a new sandbox
    *          stop                       stopping   stop_signal to the init; SIGKILL to the
                                                     cgroup after stop_timeout
    stopping   exited                     stopped

The sockets are bound before the first sandbox exists and stay open until the stack is down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import statistics
import time
from collections.abc import Awaitable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from .cgroups import Cgroup, CgroupHost, CgroupManager
from .console import Console
from .control import ControlServer
from .errors import HostError, LaunchError, SpecErrors
from .launcher import ForkServer, read_status
from .logs import LogFiles
from .notify import Message, NotifySocket, host_pid, main_pid_of
from .plan import LaunchPlan, NetworkPlan, uses_notify
from .restart import Outcome, StartLimiter, classify, restart_delay, should_restart
from .sockets import BoundSocket, bind_sockets, close_sockets
from .spec import Dependency, HealthCheck, Limits, Service, Stack
from .state import RUNTIME_ROOT, StateRecord, _alive

if TYPE_CHECKING:
    from .network import Namespaces

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


class Supervisor:
    def __init__(
        self,
        stack: Stack,
        plans: dict[str, LaunchPlan],
        cgroup_host: CgroupHost,
        instance: str,
        console: Console | None = None,
        fork_server: ForkServer | None = None,
        limits: dict[str, Limits] | None = None,
        detached: bool = False,
    ) -> None:
        self.stack = stack
        self.plans = plans
        self.instance = instance
        self.runtime_dir = RUNTIME_ROOT / instance
        self.root_dir = self.runtime_dir / "root"
        self.cgroups = CgroupManager(cgroup_host, instance)
        self.console = console or Console([s.name for s in stack.services])
        self.record: StateRecord | None = None
        self.fork_server = fork_server
        self.limits = limits if limits is not None else {s.name: s.limits for s in stack.services}
        self.detached = detached
        self.control: ControlServer | None = None
        self.stop_requested: asyncio.Event | None = None
        self.started_wall = time.time()
        self.sockets: dict[tuple[str, int], BoundSocket] = {}
        self.services: dict[str, ServiceRuntime] = {}
        self.by_launch: dict[int, ServiceRuntime] = {}
        self.summary_printed = False
        self.held_output: list[tuple[str, bytes]] = []
        self.stopping = False
        self.done = asyncio.Event()
        self.namespaces: Namespaces | None = None
        self.networks: tuple[NetworkPlan, ...] = ()
        self.instances: dict[int, Instance] = {}
        self.health_checks: dict[int, tuple[ServiceRuntime, socket.socket, asyncio.TimerHandle]] = {}
        self.commands: dict[int, asyncio.Future[int]] = {}  # commands run inside sandboxes (reload:)
        self.no_instances = asyncio.Event()

    # ── set-up and tear-down (synchronous, around the event loop) ──

    def run(self) -> int:
        """Bring the stack up in the foreground until SIGINT/SIGTERM or until every service is done."""
        try:
            self._prepare()
            return asyncio.run(self._main())
        finally:
            # A Ctrl-C now must not cut the clean-up short and leave things behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._cleanup()

    def _prepare(self) -> None:
        existing = self.runtime_dir / "state.json"
        if existing.exists():
            pid = json.loads(existing.read_text()).get("pid", 0)
            if _alive(pid):
                raise HostError(f"a stack named {self.instance!r} is already running (pid {pid})", "stop it first, or pick another name with -p NAME")
        if self.fork_server is None:  # forked first, while this process has no thread and no event loop
            self.fork_server = ForkServer.start()
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.root_dir.mkdir(exist_ok=True)
        self.record = StateRecord(self.runtime_dir)
        self.record.save()
        self.console.logs = LogFiles(self.runtime_dir / "logs")
        self.console.quiet = self.detached
        self.cgroups.setup()
        self.record.add("cgroups", str(self.cgroups.instance_path))
        joined = [name for name, plan in self.plans.items() if plan.net == "join"]
        if joined or self.stack.networks:
            self._prepare_networks(joined)
        self.sockets = bind_sockets(self.stack.sockets, self.record, self._inside)
        for service in self.stack.services:
            self._add_runtime(service)

    def _add_runtime(self, service: Service) -> ServiceRuntime:
        """A service's cgroup (with its limits), output pipe and notify socket."""
        assert self.record is not None
        cgroup = self.cgroups.create(service.name, self.limits.get(service.name))
        self.record.add("cgroups", str(cgroup.path))
        for path in cgroup.v1.values():
            if str(path.parent) not in self.record.cgroups:
                self.record.add("cgroups", str(path.parent))
            self.record.add("cgroups", str(path))
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        rt = ServiceRuntime(service, self.plans[service.name], cgroup, r, w)
        if uses_notify(rt.spec):
            (self.runtime_dir / "notify").mkdir(exist_ok=True)
            rt.notify = NotifySocket(self.runtime_dir / "notify" / rt.spec.name)
        self.services[service.name] = rt
        return rt

    def _drop_runtime(self, rt: ServiceRuntime) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(rt.output_r)
        self._drain_output(rt)
        if rt.notify is not None:
            loop.remove_reader(rt.notify.sock)
            rt.notify.close()
        for stored in rt.fdstore:
            os.close(stored.fd)
        for fd in (rt.output_r, rt.output_w):
            os.close(fd)
        self.cgroups.remove(rt.cgroup)
        del self.services[rt.spec.name]

    async def apply_folder(self, folder: str, env: list[str]) -> dict[str, list[str]]:
        """Load, validate and plan the folder again (as `up` does), then apply the difference."""
        from .cli import _enforceable_limits, _with_env
        from .plan import HostFacts, init_path, plan_stack
        from .spec import load_stack

        try:
            stack = _with_env(load_stack(Path(folder)), env)
            plans = plan_stack(stack, HostFacts(init_path(), str(self.runtime_dir)))
            limits = _enforceable_limits(stack, self.cgroups.host)
        except SpecErrors as e:
            raise ValueError("the new spec has problems:\n  " + "\n  ".join(str(err) for err in e.errors)) from None
        if stack.name != self.stack.name and Path(folder).resolve() != self.stack.folder:
            self.console.note(f"reload from another folder: {folder}")
        return await self.apply(stack, plans, limits)

    async def apply(self, stack: Stack, plans: dict[str, LaunchPlan], limits: dict[str, Limits]) -> dict[str, list[str]]:
        """Bring the running stack to a new spec: unchanged services keep running, changed ones
        restart, removed ones stop, new ones start; unchanged sockets keep their descriptors."""
        from .reload import diff, refusal

        change = diff(self.stack, stack)
        why = refusal(self.stack, stack, change)
        if why:
            raise ValueError(f"cannot apply this change to the running stack: {why}; use sandboxd down and up")
        assert self.record is not None
        for name in change.changed + change.removed:
            await self.stop_service(name)
        for name in change.removed:
            self.console.note(f"{name}: removed from the stack")
            self._drop_runtime(self.services[name])
        for name in change.changed:
            self._drop_runtime(self.services[name])
        replaced = set(change.sockets_replaced)
        for key in [k for k in self.sockets if k[0] in replaced]:
            self.sockets.pop(key).sock.close()
        self.stack, self.limits = stack, limits
        self.plans = plans
        fresh = bind_sockets(tuple(s for s in stack.sockets if s.name in replaced), self.record, self._inside)
        self.sockets.update(fresh)
        loop = asyncio.get_running_loop()
        for name in change.changed + change.added:
            rt = self._add_runtime(stack.service(name))
            rt.settled = asyncio.Event()
            loop.add_reader(rt.output_r, self._on_output, rt)
            if rt.notify is not None:
                loop.add_reader(rt.notify.sock, self._on_notify, rt)
            self.console.prefix_for(name)
            self.start_service(name)
        return {"added": change.added, "removed": change.removed, "changed": change.changed, "sockets_replaced": change.sockets_replaced}

    def _prepare_networks(self, joined: list[str]) -> None:
        from .network import Namespaces, allocation_lock, build_networks, choose_subnets
        from .plan import RESOLV_CONF, hosts_file, plan_networks

        assert self.record is not None
        self.namespaces = Namespaces()
        with allocation_lock():
            subnets = choose_subnets(self.stack, self.runtime_dir)
            self.record.subnets = [cidr for cidrs in subnets.values() for cidr in cidrs]
            self.record.save()
        self.networks = plan_networks(self.stack, subnets)
        for name in joined:
            self.namespaces.create(name, loopback=self.stack.service(name).network != "none")
        for service in self.stack.services:
            if service.attachments:
                etc = self.runtime_dir / "etc" / service.name
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(hosts_file(service, self.networks))
                (etc / "resolv.conf").write_text(RESOLV_CONF)
        build_networks(self.namespaces, self.networks)

    def _inside(self, service: str | None) -> AbstractContextManager[None]:
        if service is None or self.namespaces is None:
            return nullcontext()
        return self.namespaces.inside(service)

    def _cleanup(self) -> None:
        if self.fork_server is not None:
            self.fork_server.stop()
        if self.namespaces is not None:
            self.namespaces.close()  # the kernel frees the namespaces, with their links and bridges
        for rt in self.services.values():
            for fd in (rt.output_r, rt.output_w, rt.pidfd):
                if fd >= 0:
                    os.close(fd)
            if rt.channel is not None:
                rt.channel.close()
        if self.record is not None:
            close_sockets(self.sockets, self.record)
        self.cgroups.teardown()
        for path in (self.runtime_dir / "state.json", self.runtime_dir / "state.json.tmp"):
            path.unlink(missing_ok=True)
        for _rt, channel, _timer in self.health_checks.values():
            channel.close()
        self.health_checks.clear()
        for rt in self.services.values():
            if rt.notify is not None:
                rt.notify.close()
            for stored in rt.fdstore:
                os.close(stored.fd)
            rt.fdstore.clear()
        if self.console.logs is not None:
            self.console.logs.close()
        shutil.rmtree(self.runtime_dir / "logs", ignore_errors=True)
        (self.runtime_dir / "control.sock").unlink(missing_ok=True)
        shutil.rmtree(self.runtime_dir / "etc", ignore_errors=True)
        shutil.rmtree(self.runtime_dir / "notify", ignore_errors=True)
        for directory in (self.root_dir, self.runtime_dir, RUNTIME_ROOT):
            try:
                directory.rmdir()
            except OSError:
                pass

    # ── the event loop ──

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        # asyncio.Event binds to the running loop on first use; these were made before it existed.
        for rt in self.services.values():
            rt.settled = asyncio.Event()
        self.done = asyncio.Event()
        stop_requested = asyncio.Event()
        self.stop_requested = stop_requested
        self.control = ControlServer(self, self.runtime_dir / "control.sock")
        await self.control.start()

        def on_signal() -> None:
            if stop_requested.is_set():
                self.console.note("second interrupt: killing every service now")
                self.stopping = True
                for rt in self.services.values():
                    rt.cgroup.kill()
            stop_requested.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        assert self.fork_server is not None
        loop.add_reader(self.fork_server.conn, self._on_fork_server_message)
        for rt in self.services.values():
            loop.add_reader(rt.output_r, self._on_output, rt)
            if rt.notify is not None:
                loop.add_reader(rt.notify.sock, self._on_notify, rt)

        self.no_instances = asyncio.Event()
        self.no_instances.set()
        started = time.monotonic()
        for rt in self.services.values():
            if rt.per_connection or rt.spec.start == "on-demand":
                self._wait_for_connection(rt)
                rt.settled.set()
            elif rt.spec.after:
                waits = ", ".join(f"{d.service} ({d.condition})" for d in rt.spec.after)
                self.console.note(f"{rt.spec.name}: waits for {waits}")
                rt.settled.set()
            else:
                self._launch(rt)
        await self._first_of(asyncio.gather(*(rt.settled.wait() for rt in self.services.values())), stop_requested.wait())
        self._print_summary(time.monotonic() - started)
        await self._first_of(stop_requested.wait(), self.done.wait())
        if stop_requested.is_set():
            self.console.note("stopping all services")
        await self._stop_all()
        await self.control.close()
        for rt in self.services.values():
            self._drain_output(rt)
        loop.remove_reader(self.fork_server.conn)
        if stop_requested.is_set():
            return 0
        return 1 if any(rt.state is State.FAILED for rt in self.services.values()) else 0

    @staticmethod
    async def _first_of(*awaitables: Awaitable[object]) -> None:
        tasks = [asyncio.ensure_future(a) for a in awaitables]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()

    def _launch(self, rt: ServiceRuntime) -> None:
        assert self.fork_server is not None
        self._transition(rt, State.STARTING, "start" if rt.restarts == 0 else f"restart #{rt.restarts}")
        rt.launch_error = None
        rt.pid, rt.exec_ns = 0, 0
        if rt.limiter is None:
            rt.limiter = StartLimiter(rt.spec)
        rt.limiter.record(time.monotonic())
        rt.cgroup.renew()
        rt.cgroup.mark()
        rt.launch_id = self.fork_server.next_id()
        self.by_launch[rt.launch_id] = rt
        fds = [self.sockets[key].sock.fileno() for key in rt.plan.fd_sockets]
        plan = self._with_stored_fds(rt)
        fds += [stored.fd for stored in rt.fdstore]
        rt.requested_ns = time.monotonic_ns()
        netns = self.namespaces.fds[rt.spec.name] if rt.plan.net == "join" and self.namespaces else -1
        rt.channel = self.fork_server.send_launch(
            rt.launch_id, plan, str(rt.cgroup.path), rt.cgroup.extra_procs_files, str(self.root_dir), rt.output_w, fds, netns
        )
        asyncio.get_running_loop().add_reader(rt.channel, self._on_status, rt)

    def _on_status(self, rt: ServiceRuntime) -> None:
        assert rt.channel is not None
        while True:
            try:
                kind, launched = read_status(rt.channel, rt.spec.name)
            except LaunchError as e:
                rt.launch_error = e
                continue
            if kind == "pending":
                if launched is None:
                    return  # nothing more to read yet
                rt.pid, rt.pidfd, rt.exec_ns = launched.pid, launched.pidfd, launched.exec_ns
                continue
            if kind == "done":
                self._close_channel(rt)
                if rt.launch_error is None and rt.state is State.STARTING:
                    rt.started_at = time.monotonic()
                    rt.main_pid = 0
                    waiting = {"notify": " (waiting for READY=1)", "started": ""}.get(str(rt.spec.ready), " (waiting for its health check)")
                    self._transition(rt, State.RUNNING, f"pid {rt.pid}{waiting}")
                    self._arm_timers(rt)
                    rt.settled.set()
                elif rt.state is State.STOPPING and rt.pid and rt.launch_error is None:
                    self._send_stop_signal(rt)
            return

    def _close_channel(self, rt: ServiceRuntime) -> None:
        if rt.channel is not None:
            asyncio.get_running_loop().remove_reader(rt.channel)
            rt.channel.close()
            rt.channel = None

    def _on_fork_server_message(self) -> None:
        assert self.fork_server is not None
        try:
            data = self.fork_server.conn.recv(65536)
        except BlockingIOError:
            return
        if not data:
            asyncio.get_running_loop().remove_reader(self.fork_server.conn)
            self.console.note("the fork server died; stopping")
            for rt in self.services.values():
                rt.cgroup.kill()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        message = json.loads(data)
        launch_id: int = message.get("exit", message.get("failed"))
        if launch_id in self.commands:
            if not self.commands[launch_id].done():
                self.commands[launch_id].set_result(message.get("status", 127 << 8))
            return
        if launch_id in self.health_checks:
            self._on_health_result(launch_id, message.get("status", 127 << 8))
            return
        instance = self.instances.pop(launch_id, None)
        if instance is not None:
            self._on_instance_exit(instance, message.get("status", 127 << 8))
            return
        launched = self.by_launch.pop(launch_id, None)
        if launched is None:
            return
        if "failed" in message:
            launched.launch_error = LaunchError(launched.spec.name, "fork", message["detail"])
            self._on_exit(launched, 127 << 8)
        else:
            self._on_exit(launched, message["status"])

    def _on_exit(self, rt: ServiceRuntime, status: int) -> None:
        if rt.channel is not None:
            self._on_status(rt)  # the exit may be seen before the status channel's last words
            self._close_channel(rt)
        if rt.pidfd >= 0:
            os.close(rt.pidfd)
            rt.pidfd = -1
        if rt.timer is not None:
            rt.timer.cancel()
            rt.timer = None
        if rt.cgroup.populated():
            rt.cgroup.kill()  # the namespace's init is gone; make sure nothing else is left either
        self._disarm_timers(rt)
        outcome, text = classify(status)
        why = rt.cgroup.why_failed()
        if why:
            text = f"{why}; {text}"
        usage = self._usage(rt)
        if rt.launch_error is not None:
            outcome, text = "exit-code", f"could not start: {rt.launch_error.step}: {rt.launch_error.detail}"
        if rt.kill_reason is not None:
            outcome, why = rt.kill_reason
            text = f"{why}; {text}"
            rt.kill_reason = None
        if rt.errno:
            text += f" (ERRNO={rt.errno}: {os.strerror(rt.errno)})"
            rt.errno = 0
        match rt.state:
            case State.STOPPING if rt.idle_stopping and not self.stopping:
                rt.idle_stopping = False
                self._transition(rt, State.WAITING, f"{text}; waiting for the next connection")
                self._watch(rt)
            case State.STOPPING:
                self._transition(rt, State.STOPPED, text)
            case State.STARTING | State.RUNNING | State.READY | State.RELOADING:
                self._after_unexpected_exit(rt, outcome, text)
            case _:
                pass
        if rt.state in (State.STOPPED, State.EXITED, State.FAILED):
            self.console.note(f"{rt.spec.name}: used {usage}")
        rt.settled.set()
        self._check_done()

    def _usage(self, rt: ServiceRuntime) -> str:
        stats = rt.cgroup.stats()
        parts = [f"cpu {stats['cpu_usec'] / 1e6:.2f} s"]
        if "memory_peak" in stats:
            parts.append(f"memory peak {stats['memory_peak'] / (1 << 20):.1f} MiB")
        return ", ".join(parts)

    def _after_unexpected_exit(self, rt: ServiceRuntime, outcome: Outcome, text: str) -> None:
        final = State.EXITED if outcome == "success" else State.FAILED
        if self.stopping or not should_restart(rt.spec.restart, outcome):
            if rt.spec.start == "on-demand" and not self.stopping:
                # Socket activation: the socket is watched again, as systemd re-arms a .socket unit.
                self._transition(rt, State.WAITING, f"{text}; waiting for the next connection")
                self._watch(rt)
                return
            self._transition(rt, final, text)
            return
        assert rt.limiter is not None
        if rt.limiter.exhausted(time.monotonic()):
            limit = rt.spec.start_limit
            self._transition(
                rt, State.FAILED, f"{text}; gave up after {limit.burst} starts within {limit.interval:g} s (start_limit; the others keep running)"
            )
            return
        delay = restart_delay(rt.spec, rt.limiter.in_a_row)
        self._transition(rt, State.BACKOFF, f"{text}; restarting in {delay:g} s")
        rt.restarts += 1
        rt.timer = asyncio.get_running_loop().call_later(delay, self._restart_after_backoff, rt)

    # ── readiness, start timeout and watchdog (sd_notify) ──

    def _arm_timers(self, rt: ServiceRuntime) -> None:
        loop = asyncio.get_running_loop()
        if rt.spec.ready != "started" and rt.spec.start_timeout > 0:
            rt.start_timer = loop.call_later(rt.spec.start_timeout, self._on_start_timeout, rt)
        if isinstance(rt.spec.ready, HealthCheck):
            rt.health_failures = 0
            rt.health_timer = loop.call_later(HEALTH_FIRST_CHECK, self._run_health_check, rt)
        if rt.spec.watchdog > 0:
            rt.watchdog_timer = loop.call_later(rt.spec.watchdog, self._on_watchdog, rt)
        self._arm_idle_check(rt)

    def _disarm_timers(self, rt: ServiceRuntime) -> None:
        for timer in (rt.start_timer, rt.watchdog_timer, rt.idle_timer, rt.health_timer):
            if timer is not None:
                timer.cancel()
        rt.start_timer = rt.watchdog_timer = rt.idle_timer = rt.health_timer = None

    def _on_start_timeout(self, rt: ServiceRuntime) -> None:
        rt.start_timer = None
        if rt.state is State.RUNNING:
            self._kill_for(rt, "timeout", f"not ready within start_timeout ({rt.spec.start_timeout:g} s)", rt.spec.stop_signal)

    def _on_watchdog(self, rt: ServiceRuntime) -> None:
        rt.watchdog_timer = None
        if rt.state in (State.RUNNING, State.READY, State.RELOADING):
            self._kill_for(rt, "watchdog", f"watchdog timeout: no WATCHDOG=1 within {rt.spec.watchdog:g} s", signal.SIGABRT)

    def _kill_for(self, rt: ServiceRuntime, outcome: Outcome, why: str, sig: int) -> None:
        """Stop a service that failed while running; its exit is then judged as `outcome`."""
        self.console.note(f"{rt.spec.name}: {why}; sending {signal.Signals(sig).name}")
        rt.kill_reason = (outcome, why)
        self._disarm_timers(rt)
        self._signal_init(rt, sig)

        def kill_after_timeout() -> None:
            if rt.kill_reason is not None and rt.state in ALIVE:
                rt.cgroup.kill()

        rt.timer = asyncio.get_running_loop().call_later(rt.spec.stop_timeout, kill_after_timeout)

    def _signal_init(self, rt: ServiceRuntime, sig: int) -> None:
        try:
            if rt.pidfd >= 0:
                signal.pidfd_send_signal(rt.pidfd, sig)
            else:
                rt.cgroup.kill()
        except ProcessLookupError:
            pass

    def _on_notify(self, rt: ServiceRuntime) -> None:
        assert rt.notify is not None
        while (message := rt.notify.receive()) is not None:
            try:
                if self._may_notify(rt, message.pid):
                    self._apply_notify(rt, message.fields)
                    if message.fields.get("FDSTOREREMOVE") == "1":
                        self._fdstore_remove(rt, message.fields.get("FDNAME", "stored"))
                    if message.fields.get("FDSTORE") == "1" and message.fds:
                        self._fdstore_add(rt, message)
            finally:
                message.close_fds()  # what was not stored; BARRIER=1's descriptor is answered by closing it

    # ── health checks: a command inside the sandbox ──

    def _run_health_check(self, rt: ServiceRuntime) -> None:
        rt.health_timer = None
        check = rt.spec.ready
        assert isinstance(check, HealthCheck) and self.fork_server is not None
        if rt.state not in (State.RUNNING, State.READY) or rt.health_running or not rt.pid:
            return
        rt.health_running = True
        launch_id = self.fork_server.next_id()
        env = {k: v for k, v in rt.plan.env if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        channel = self.fork_server.send_exec(
            launch_id, rt.pid, str(rt.cgroup.path), list(check.exec), env, rt.spec.workdir,
            rt.plan.capabilities, rt.plan.seccomp_filter, rt.plan.uid, rt.plan.gid,
        )
        timeout = asyncio.get_running_loop().call_later(check.timeout, self._health_timed_out, launch_id)
        self.health_checks[launch_id] = (rt, channel, timeout)

    def _health_timed_out(self, launch_id: int) -> None:
        entry = self.health_checks.get(launch_id)
        if entry is None:
            return
        _rt, channel, _timer = entry
        try:
            _kind, launched = read_status(channel, "health check")
        except LaunchError:
            launched = None
        if launched is not None and launched.pidfd >= 0:
            signal.pidfd_send_signal(launched.pidfd, signal.SIGKILL)  # its command dies with it
            os.close(launched.pidfd)

    def _on_health_result(self, launch_id: int, status: int) -> None:
        rt, channel, timer = self.health_checks.pop(launch_id)
        timer.cancel()
        channel.close()
        rt.health_running = False
        check = rt.spec.ready
        assert isinstance(check, HealthCheck)
        if rt.state not in (State.RUNNING, State.READY):
            return
        ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if ok:
            rt.health_failures = 0
            if rt.state is State.RUNNING:
                if rt.start_timer is not None:
                    rt.start_timer.cancel()
                    rt.start_timer = None
                self._transition(rt, State.READY, f"health check passed after {time.monotonic() - rt.started_at:.3f} s")
        elif rt.state is State.READY:
            rt.health_failures += 1
            _outcome, text = classify(status)
            self.console.note(f"{rt.spec.name}: health check failed ({text}), {rt.health_failures} of {check.retries}")
            if rt.health_failures >= check.retries:
                self._kill_for(rt, "watchdog", f"unhealthy: health check failed {check.retries} times in a row", rt.spec.stop_signal)
                return
        delay = check.interval if rt.state is State.READY else min(check.interval, HEALTH_FIRST_CHECK * 2)
        rt.health_timer = asyncio.get_running_loop().call_later(delay, self._run_health_check, rt)

    # ── the fd store ──

    def _fdstore_add(self, rt: ServiceRuntime, message: Message) -> None:
        name = message.fields.get("FDNAME", "stored")
        poll = message.fields.get("FDPOLL", "1") != "0"
        known = {(st.st_dev, st.st_ino) for st in (os.fstat(s.fd) for s in rt.fdstore)}
        for fd in list(message.fds):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in known:
                continue  # the same open file twice: kept once, as systemd does
            if len(rt.fdstore) >= rt.spec.fdstore_max:
                self.console.note(f"{rt.spec.name}: fd store full (fdstore_max {rt.spec.fdstore_max}); descriptor dropped")
                break
            message.fds.remove(fd)
            rt.fdstore.append(StoredFd(name, fd, poll))
            known.add((st.st_dev, st.st_ino))
        if rt.fdstore and rt.fdstore_timer is None:
            rt.fdstore_timer = asyncio.get_running_loop().call_later(FDSTORE_POLL, self._fdstore_poll, rt)

    def _fdstore_remove(self, rt: ServiceRuntime, name: str) -> None:
        for stored in [s for s in rt.fdstore if s.name == name]:
            os.close(stored.fd)
            rt.fdstore.remove(stored)

    def _fdstore_poll(self, rt: ServiceRuntime) -> None:
        """Drop stored descriptors that report hang-up or error (poll with no events asks just that)."""
        rt.fdstore_timer = None
        poller = select.poll()
        for stored in rt.fdstore:
            if stored.poll:
                poller.register(stored.fd, 0)
        dead = {fd for fd, events in poller.poll(0) if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL)}
        for stored in [s for s in rt.fdstore if s.fd in dead]:
            self.console.note(f"{rt.spec.name}: stored descriptor '{stored.name}' hung up; dropped from the fd store")
            os.close(stored.fd)
            rt.fdstore.remove(stored)
        if rt.fdstore and not self.stopping:
            rt.fdstore_timer = asyncio.get_running_loop().call_later(FDSTORE_POLL, self._fdstore_poll, rt)

    def _with_stored_fds(self, rt: ServiceRuntime) -> LaunchPlan:
        """The plan, with the fd store's descriptors after the listening sockets (named by FDNAME)."""
        if not rt.fdstore:
            return rt.plan
        self._fdstore_poll(rt)
        names = (*rt.plan.fd_names, *(s.name for s in rt.fdstore))
        env = [(k, v) for k, v in rt.plan.env if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")]
        env += [("LISTEN_FDS", str(len(names))), ("LISTEN_PID", "2"), ("LISTEN_FDNAMES", ":".join(names))]
        return dataclasses.replace(rt.plan, env=tuple(env), fd_names=names)

    def _may_notify(self, rt: ServiceRuntime, pid: int) -> bool:
        if rt.state not in (State.RUNNING, State.READY, State.RELOADING) or not pid:
            return False
        if rt.spec.notify_access == "all":
            return pid in rt.cgroup.pids()
        if not rt.main_pid:
            rt.main_pid = main_pid_of(rt.pid)
        return pid == rt.main_pid

    def _apply_notify(self, rt: ServiceRuntime, fields: dict[str, str]) -> None:
        name = rt.spec.name
        if "MAINPID" in fields and fields["MAINPID"].isdigit():
            rt.main_pid = host_pid(rt.cgroup.pids(), int(fields["MAINPID"])) or rt.main_pid
        if "STATUS" in fields and fields["STATUS"] != rt.status_text:
            rt.status_text = fields["STATUS"]
            self.console.note(f"{name}: status: {rt.status_text}")
        if fields.get("ERRNO", "").isdigit():
            rt.errno = int(fields["ERRNO"])
        if "WATCHDOG_USEC" in fields and fields["WATCHDOG_USEC"].isdigit():
            rt.spec = dataclasses.replace(rt.spec, watchdog=int(fields["WATCHDOG_USEC"]) / 1e6)
        if fields.get("WATCHDOG") == "1" and rt.spec.watchdog > 0:
            if rt.watchdog_timer is not None:
                rt.watchdog_timer.cancel()
            rt.watchdog_timer = asyncio.get_running_loop().call_later(rt.spec.watchdog, self._on_watchdog, rt)
        elif fields.get("WATCHDOG") == "trigger":
            self._on_watchdog(rt)
            return
        if fields.get("EXTEND_TIMEOUT_USEC", "").isdigit() and rt.start_timer is not None:
            rt.start_timer.cancel()
            extra = int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6
            rt.start_timer = asyncio.get_running_loop().call_later(extra, self._on_start_timeout, rt)
        if fields.get("STOPPING") == "1":
            self.console.note(f"{name}: says it is stopping")
        if fields.get("RELOADING") == "1" and rt.state is State.READY:
            self._transition(rt, State.RELOADING, "RELOADING=1")
        if fields.get("READY") == "1" and rt.state in (State.RUNNING, State.RELOADING):
            if rt.start_timer is not None:
                rt.start_timer.cancel()
                rt.start_timer = None
            self._transition(rt, State.READY, "READY=1" + (f" after {time.monotonic() - rt.started_at:.3f} s" if rt.state is State.RUNNING else ""))

    def _restart_after_backoff(self, rt: ServiceRuntime) -> None:
        rt.timer = None
        if rt.state is State.BACKOFF and not self.stopping:
            self._launch(rt)

    def _transition(self, rt: ServiceRuntime, new: State, reason: str) -> None:
        old, rt.state = rt.state, new
        quiet = {(State.STOPPED, State.STARTING), (State.STARTING, State.RUNNING)} if not self.summary_printed else set()
        if (old, new) not in quiet:
            self.console.note(f"{rt.spec.name}: {old.value} -> {new.value}: {reason}")
        if new in (State.RUNNING, State.READY, State.EXITED, State.FAILED, State.WAITING):
            asyncio.get_running_loop().call_soon(self._release_dependents)

    # ── after: dependencies for what cannot go through a socket ──

    def _condition(self, dep: Dependency) -> bool | None:
        """Whether `dep` is met (True), not yet (False), or never will be (None)."""
        other = self.services[dep.service]
        notify = other.spec.ready != "started"
        match dep.condition:
            case "started":
                met = other.state in (State.RUNNING, State.READY, State.RELOADING, State.WAITING, State.EXITED)
            case "ready":
                met = other.state in (State.READY, State.WAITING) or (other.state is State.RUNNING and not notify)
            case "completed":
                met = other.state is State.EXITED
        if met:
            return True
        return None if other.state in (State.FAILED, State.STOPPED) or (dep.condition != "completed" and other.state is State.EXITED) else False

    def _release_dependents(self) -> None:
        if self.stopping:
            return
        for rt in self.services.values():
            if rt.state is not State.STOPPED or not rt.spec.after or rt.restarts or rt.limiter is not None:
                continue
            results = [(dep, self._condition(dep)) for dep in rt.spec.after]
            broken = [dep for dep, met in results if met is None]
            if broken:
                dep = broken[0]
                self._transition(rt, State.FAILED, f"{dep.service} will never be {dep.condition} (it is {self.services[dep.service].state.value})")
                self._check_done()
            elif all(met for _, met in results):
                self._launch(rt)

    def _check_done(self) -> None:
        if self.detached:
            return  # a detached stack runs until `sandboxd down`, even with every service stopped

        def finished(rt: ServiceRuntime) -> bool:
            pending = rt.state is State.STOPPED and bool(rt.spec.after) and rt.limiter is None
            return rt.state in FINAL and not pending

        if all(finished(rt) for rt in self.services.values()):
            self.done.set()

    # ── stopping ──

    def _send_stop_signal(self, rt: ServiceRuntime) -> None:
        try:
            if rt.pidfd >= 0:
                signal.pidfd_send_signal(rt.pidfd, rt.spec.stop_signal)
            else:
                rt.cgroup.kill()
        except ProcessLookupError:
            pass

    async def _stop(self, rt: ServiceRuntime) -> None:
        if rt.state is State.BACKOFF:
            if rt.timer is not None:
                rt.timer.cancel()
                rt.timer = None
            self._transition(rt, State.STOPPED, "stop requested during restart delay")
            return
        if rt.state is State.STOPPING:
            await rt.settled.wait()
            return
        if rt.state not in ALIVE:
            return
        self._begin_stop(rt, f"sending {signal.Signals(rt.spec.stop_signal).name}")
        await rt.settled.wait()

    def _begin_stop(self, rt: ServiceRuntime, reason: str) -> None:
        """stop_signal to the init now; SIGKILL to the whole cgroup after stop_timeout."""
        self._disarm_timers(rt)
        self._transition(rt, State.STOPPING, reason)
        rt.settled.clear()
        if rt.pid and rt.channel is None:
            self._send_stop_signal(rt)

        def kill_after_timeout() -> None:
            if rt.state is State.STOPPING:
                self.console.note(f"{rt.spec.name}: did not stop within {rt.spec.stop_timeout:g} s; killing its cgroup")
                rt.cgroup.kill()

        rt.timer = asyncio.get_running_loop().call_later(rt.spec.stop_timeout, kill_after_timeout)

    async def _stop_all(self) -> None:
        self.stopping = True
        for rt in self.services.values():
            self._unwatch(rt)
            if rt.state is State.WAITING:
                self._transition(rt, State.STOPPED, "stop requested")
        await asyncio.gather(*(self._stop(rt) for rt in self.services.values()), self._stop_instances())

    # ── control plane ──

    def status(self, names: list[str]) -> dict[str, object]:
        chosen = [self.services[n] for n in names] if names else list(self.services.values())
        return {
            "stack": self.instance,
            "folder": str(self.stack.folder),
            "pid": os.getpid(),
            "started": self.started_wall,
            "services": [_status_of(self, rt) for rt in chosen],
        }

    async def stop_service(self, name: str) -> None:
        rt = self.services[name]
        self._unwatch(rt)
        if rt.state is State.WAITING:
            self._transition(rt, State.STOPPED, "stop requested")
            return
        await self._stop(rt)

    def start_service(self, name: str) -> None:
        rt = self.services[name]
        if rt.state not in (State.STOPPED, State.EXITED, State.FAILED) or self.stopping:
            return
        rt.limiter = None  # a start by hand begins a new start-limit interval
        if rt.per_connection or rt.spec.start == "on-demand":
            self._wait_for_connection(rt)
        else:
            self._launch(rt)

    def kill_service(self, name: str, signame: str) -> None:
        rt = self.services[name]
        sig = signal.Signals[signame if signame.startswith("SIG") else f"SIG{signame}"]
        if rt.state in ALIVE:
            self._signal_init(rt, sig)

    def exec_info(self, name: str) -> dict[str, object]:
        rt = self.services[name]
        if rt.state not in (State.RUNNING, State.READY, State.RELOADING) or not rt.pid:
            raise KeyError(f"service {name!r} is not running ({rt.state.value})")
        env = [(k, v) for k, v in rt.plan.env if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))]
        return {
            "init_pid": rt.pid,
            "cgroup": str(rt.cgroup.path),
            "capabilities": list(rt.plan.capabilities),
            "seccomp_filter": rt.plan.seccomp_filter,
            "uid": rt.plan.uid,
            "gid": rt.plan.gid,
            "env": env,
            "workdir": rt.spec.workdir,
        }

    async def reload_service(self, name: str) -> str:
        """The service's own reload: its reload_signal to the main process; with ready: notify, wait
        for RELOADING=1 and READY=1 (up to start_timeout). Returns an error text, or ""."""
        rt = self.services[name]
        if rt.state not in (State.RUNNING, State.READY):
            return f"{name} is not running ({rt.state.value})"
        if rt.spec.reload:
            self.console.note(f"{name}: reload: running {' '.join(rt.spec.reload)} inside its sandbox")
            code = await self._run_inside(rt, list(rt.spec.reload), rt.spec.start_timeout)
            if code != 0:
                return f"{name}: the reload command failed (exit code {code})"
        else:
            self.console.note(f"{name}: reload: sending {signal.Signals(rt.spec.reload_signal).name}")
            self._signal_init(rt, rt.spec.reload_signal)
        if rt.spec.ready != "notify":
            return ""
        deadline = time.monotonic() + rt.spec.start_timeout
        seen_reloading = False
        while time.monotonic() < deadline:
            state = self.services[name].state  # changes while we wait
            seen_reloading = seen_reloading or state is State.RELOADING
            if seen_reloading and state is State.READY:
                return ""
            if state not in (State.READY, State.RELOADING):
                return f"{name} stopped while reloading ({state.value})"
            await asyncio.sleep(0.01)
        return f"{name} did not finish reloading within {rt.spec.start_timeout:g} s"

    async def _run_inside(self, rt: ServiceRuntime, argv: list[str], timeout: float) -> int:
        """Run a command inside a running sandbox (as health checks run) and wait for its exit code."""
        assert self.fork_server is not None
        launch_id = self.fork_server.next_id()
        env = {k: v for k, v in rt.plan.env if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.commands[launch_id] = done
        channel = self.fork_server.send_exec(
            launch_id, rt.pid, str(rt.cgroup.path), argv, env, rt.spec.workdir,
            rt.plan.capabilities, rt.plan.seccomp_filter, rt.plan.uid, rt.plan.gid, rt.output_w,
        )
        try:
            status = await asyncio.wait_for(done, timeout)
        except TimeoutError:
            return 124
        finally:
            self.commands.pop(launch_id, None)
            channel.close()
        return os.waitstatus_to_exitcode(status)

    def request_down(self) -> None:
        if self.stop_requested is not None:
            self.stop_requested.set()

    # ── activation: on the first connection, or one sandbox per connection ──

    def _wait_for_connection(self, rt: ServiceRuntime) -> None:
        if rt.state is not State.WAITING:
            what = "one sandbox per connection" if rt.per_connection else "the first connection"
            self._transition(rt, State.WAITING, f"starts on {what}")
        self._watch(rt)

    def _watch(self, rt: ServiceRuntime) -> None:
        if rt.watching or self.stopping:
            return
        loop = asyncio.get_running_loop()
        for key in rt.plan.fd_sockets:
            if rt.per_connection:
                loop.add_reader(self.sockets[key].sock, self._on_accept, rt, key)
            else:
                loop.add_reader(self.sockets[key].sock, self._on_activation, rt, key)
        rt.watching = True

    def _unwatch(self, rt: ServiceRuntime) -> None:
        if rt.watching:
            loop = asyncio.get_running_loop()
            for key in rt.plan.fd_sockets:
                loop.remove_reader(self.sockets[key].sock)
            rt.watching = False

    def _on_activation(self, rt: ServiceRuntime, key: tuple[str, int]) -> None:
        self._unwatch(rt)
        if rt.limiter is not None and rt.limiter.exhausted(time.monotonic()):
            limit = rt.spec.start_limit
            self._transition(
                rt,
                State.FAILED,
                f"socket {key[0]}: its service keeps failing on activation ({limit.burst} starts within "
                f"{limit.interval:g} s); no longer activated (trigger limit)",
            )
            self._check_done()
            return
        self.console.note(f"{rt.spec.name}: activated by {self.sockets[key].real_address()}")
        self._launch(rt)

    def _on_accept(self, rt: ServiceRuntime, key: tuple[str, int]) -> None:
        """Accept one connection and start a sandbox of its own for it (systemd's Accept=yes)."""
        assert self.fork_server is not None
        max_connections = min(next(s for s in self.stack.sockets if s.name == key[0]).max_connections, 65536)
        if rt.instances >= max_connections:
            self._unwatch(rt)  # further connections wait in the queue until an instance ends
            return
        try:
            conn, peer = self.sockets[key].sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        rt.instance_counter += 1
        rt.instances += 1
        self.no_instances.clear()
        name = f"{rt.spec.name}@{rt.instance_counter}"
        env = [(k, v) for k, v in rt.plan.env if not k.startswith("LISTEN_")]
        env += [("LISTEN_FDS", "1"), ("LISTEN_PID", "2"), ("LISTEN_FDNAMES", "connection")]
        if isinstance(peer, tuple):
            env += [("REMOTE_ADDR", str(peer[0])), ("REMOTE_PORT", str(peer[1]))]
        plan = dataclasses.replace(rt.plan, service=name, env=tuple(env), fd_names=("connection",), fd_sockets=())
        cgroup = self.cgroups.create(name)
        launch_id = self.fork_server.next_id()
        instance = Instance(rt, name, cgroup)
        self.instances[launch_id] = instance
        netns = self.namespaces.fds[rt.spec.name] if rt.plan.net == "join" and self.namespaces else -1
        try:
            instance.channel = self.fork_server.send_launch(
                launch_id, plan, str(cgroup.path), cgroup.extra_procs_files, str(self.root_dir), rt.output_w, [conn.fileno()], netns
            )
        finally:
            conn.close()  # the fork server holds its own copy now
        asyncio.get_running_loop().add_reader(instance.channel, self._on_instance_status, instance)
        if rt.instances >= max_connections:
            self._unwatch(rt)

    def _on_instance_status(self, instance: Instance) -> None:
        assert instance.channel is not None
        while True:
            try:
                kind, launched = read_status(instance.channel, instance.name)
            except LaunchError as e:
                self.console.note(f"{instance.name}: could not start: {e.step}: {e.detail}")
                continue
            if kind == "pending" and launched is not None:
                instance.pidfd = launched.pidfd
                continue
            if kind == "done":
                asyncio.get_running_loop().remove_reader(instance.channel)
                instance.channel.close()
                instance.channel = None
            return

    def _on_instance_exit(self, instance: Instance, status: int) -> None:
        if instance.channel is not None:
            self._on_instance_status(instance)
        if instance.pidfd >= 0:
            os.close(instance.pidfd)
        outcome, text = classify(status)
        if outcome != "success" and not self.stopping:
            self.console.note(f"{instance.name}: {text}")
        if instance.cgroup.populated():
            instance.cgroup.kill()
        self.cgroups.remove(instance.cgroup)
        rt = instance.rt
        rt.instances -= 1
        if not any(True for _ in self.instances.values()):
            self.no_instances.set()
        if not self.stopping and rt.state is State.WAITING:
            self._watch(rt)

    async def _stop_instances(self) -> None:
        for instance in list(self.instances.values()):
            try:
                if instance.pidfd >= 0:
                    signal.pidfd_send_signal(instance.pidfd, instance.rt.spec.stop_signal)
                else:
                    instance.cgroup.kill()
            except ProcessLookupError:
                pass
        timeout = max((i.rt.spec.stop_timeout for i in self.instances.values()), default=0.0)
        try:
            await asyncio.wait_for(self.no_instances.wait(), timeout)
        except TimeoutError:
            for instance in list(self.instances.values()):
                instance.cgroup.kill()
            await self.no_instances.wait()

    # ── scale to zero: idle_stop ──

    def _arm_idle_check(self, rt: ServiceRuntime) -> None:
        if rt.spec.idle_stop > 0 and rt.spec.start == "on-demand":
            rt.last_activity, rt.last_usage = time.monotonic(), -1
            period = max(rt.spec.idle_stop / 5, 0.05)
            rt.idle_timer = asyncio.get_running_loop().call_later(period, self._idle_check, rt, period)

    def _idle_check(self, rt: ServiceRuntime, period: float) -> None:
        rt.idle_timer = None
        if rt.state not in (State.RUNNING, State.READY):
            return
        now = time.monotonic()
        usage = rt.cgroup.cpu_usage_usec()
        listening = [self.sockets[key].sock for key in rt.plan.fd_sockets]
        pending = bool(select.select(listening, [], [], 0)[0])
        if pending or usage != rt.last_usage or rt.cgroup.holds_sockets_besides(listening):
            rt.last_activity, rt.last_usage = now, usage
        if now - rt.last_activity >= rt.spec.idle_stop:
            rt.idle_stopping = True
            self._begin_stop(rt, f"idle for {rt.spec.idle_stop:g} s")
            return
        rt.idle_timer = asyncio.get_running_loop().call_later(period, self._idle_check, rt, period)

    # ── output ──

    def _on_output(self, rt: ServiceRuntime) -> None:
        try:
            data = os.read(rt.output_r, 65536)
        except BlockingIOError:
            return
        *lines, rt.partial = (rt.partial + data).split(b"\n")
        for line in lines:
            self._emit(rt.spec.name, line)
        if len(rt.partial) > 65536:
            self._emit(rt.spec.name, rt.partial)
            rt.partial = b""

    def _drain_output(self, rt: ServiceRuntime) -> None:
        while True:
            try:
                data = os.read(rt.output_r, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            *lines, rt.partial = (rt.partial + data).split(b"\n")
            for line in lines:
                self._emit(rt.spec.name, line)
        if rt.partial:
            self._emit(rt.spec.name, rt.partial)
            rt.partial = b""
        asyncio.get_running_loop().remove_reader(rt.output_r)

    def _emit(self, name: str, line: bytes) -> None:
        if self.summary_printed:
            self.console.line(name, line)
        else:
            self.held_output.append((name, line))

    def _describe_network(self, rt: ServiceRuntime) -> str:
        match rt.spec.network:
            case "host":
                return "network: host (shares the host's network namespace)"
            case "none":
                return "network: none"
            case "private":
                return "network: private (lo only)"
        places = [
            f"{network.name} {' '.join(a.split('/')[0] for a in member.addresses)}"
            for network in self.networks
            for member in network.members
            if member.service == rt.spec.name
        ]
        return "on " + ", ".join(places)

    def _print_summary(self, elapsed: float) -> None:
        latencies = [(rt.exec_ns - rt.requested_ns) / 1e6 for rt in self.services.values() if rt.exec_ns]
        median = f", median launch {statistics.median(latencies):.1f} ms" if latencies else ""
        self.console.note(f"stack {self.instance!r}: {len(self.services)} services launched in {elapsed * 1000:.0f} ms{median}")
        for rt in self.services.values():
            socks = []
            for fd, key in enumerate(rt.plan.fd_sockets, start=3):
                sock_unit = next(s for s in self.stack.sockets if s.name == key[0])
                inside = f" in {sock_unit.netns if sock_unit.netns != 'service' else rt.spec.name}'s namespace" if sock_unit.netns != "host" else ""
                socks.append(f"{self.sockets[key].real_address()}{inside} (fd {fd} {rt.plan.fd_names[fd - 3]})")
            uses = [f"uses {name}" for name in rt.spec.uses]
            where = f"pid {rt.pid}" if rt.state in (State.RUNNING, State.READY) else rt.state.value
            if rt.state is State.RUNNING and rt.spec.ready != "started":
                where += ", not ready yet"
            if rt.status_text:
                where += f", status: {rt.status_text}"
            self.console.note(f"  {rt.spec.name}: {where}; {self._describe_network(rt)}; " + ("; ".join(socks + uses) or "no sockets"))
        self.summary_printed = True
        for name, line in self.held_output:
            self.console.line(name, line)
        self.held_output.clear()


# ── the control plane's operations (control.py calls these) ──


def _status_of(sup: Supervisor, rt: ServiceRuntime) -> dict[str, object]:
    sockets = []
    for key in rt.plan.fd_sockets:
        unit = next(s for s in sup.stack.sockets if s.name == key[0])
        sockets.append({"socket": unit.name, "address": sup.sockets[key].real_address(), "fdname": unit.fdname, "netns": unit.netns})
    stats = rt.cgroup.stats()
    alive = rt.state in (State.RUNNING, State.READY, State.RELOADING, State.STOPPING)
    return {
        "name": rt.spec.name,
        "state": rt.state.value,
        "pid": rt.pid if alive else 0,
        "uptime": round(time.monotonic() - rt.started_at, 3) if alive else 0,
        "restarts": rt.restarts,
        "ready": rt.state in (State.READY,) or (rt.state is State.RUNNING and rt.spec.ready == "started"),
        "status_text": rt.status_text,
        "sockets": sockets,
        "memory": stats.get("memory_current", 0),
        "cpu_seconds": round(stats["cpu_usec"] / 1e6, 3),
        "processes": stats["processes"],
        "instances": rt.instances,
    }


def runtime_path(instance: str) -> Path:
    return RUNTIME_ROOT / instance
