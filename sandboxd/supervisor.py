"""The supervisor: binds the sockets, launches every sandbox at once, restarts, stops, cleans up.

One asyncio loop, no threads. Each service's life is the table below; every transition is
logged once with its reason.

    state      event                      next       action
    ─────────  ─────────────────────────  ─────────  ──────────────────────────────────────────
    stopped    start                      starting   ask the fork server for a sandbox
    starting   child about to exec        running    remember its host pid (and a pidfd)
    starting   set-up failed / exited     backoff    or failed/exited, per `restart:`
    running    exited                     backoff    or failed/exited, per `restart:`
    backoff    delay elapsed              starting   the same sockets, a new sandbox
    backoff    5 restarts within 10 s     failed     "gave up" once, the rest keep running
    *          stop                       stopping   stop_signal to the init; SIGKILL to the
                                                     cgroup after stop_timeout
    stopping   exited                     stopped

The sockets are bound before the first sandbox exists and stay open until the stack is down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import time
from collections import deque
from collections.abc import Awaitable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from .cgroups import Cgroup, CgroupHost, CgroupManager
from .console import Console
from .errors import HostError, LaunchError
from .launcher import ForkServer, read_status
from .plan import LaunchPlan, NetworkPlan
from .sockets import BoundSocket, bind_sockets, close_sockets
from .spec import Service, Stack
from .state import RUNTIME_ROOT, StateRecord, _alive

if TYPE_CHECKING:
    from .network import Namespaces

START_LIMIT_BURST = 5
START_LIMIT_INTERVAL = 10.0
MAX_RESTART_DELAY = 5.0


class State(Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"


FINAL = (State.STOPPED, State.EXITED, State.FAILED)


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
    recent_failures: deque[float] = field(default_factory=deque)
    partial: bytes = b""
    timer: asyncio.TimerHandle | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)


def describe_status(status: int) -> tuple[bool, str]:
    """(clean, text) for a wait status of the sandbox init (dumb-init exits 128+n for a signal)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return False, f"killed by {signal.Signals(sig).name}"
    code = os.WEXITSTATUS(status)
    if code > 128 and code - 128 < signal.NSIG:
        try:
            return False, f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return code == 0, f"exited with code {code}"


class Supervisor:
    def __init__(self, stack: Stack, plans: dict[str, LaunchPlan], cgroup_host: CgroupHost, instance: str, console: Console | None = None) -> None:
        self.stack = stack
        self.plans = plans
        self.instance = instance
        self.runtime_dir = RUNTIME_ROOT / instance
        self.root_dir = self.runtime_dir / "root"
        self.cgroups = CgroupManager(cgroup_host, instance)
        self.console = console or Console([s.name for s in stack.services])
        self.record: StateRecord | None = None
        self.fork_server: ForkServer | None = None
        self.sockets: dict[tuple[str, int], BoundSocket] = {}
        self.services: dict[str, ServiceRuntime] = {}
        self.by_launch: dict[int, ServiceRuntime] = {}
        self.summary_printed = False
        self.held_output: list[tuple[str, bytes]] = []
        self.stopping = False
        self.done = asyncio.Event()
        self.namespaces: Namespaces | None = None
        self.networks: tuple[NetworkPlan, ...] = ()

    # ── set-up and tear-down (synchronous, around the event loop) ──

    def run(self) -> int:
        """Bring the stack up in the foreground until SIGINT/SIGTERM or until every service is done."""
        try:
            self._prepare()
            return asyncio.run(self._main())
        finally:
            self._cleanup()

    def _prepare(self) -> None:
        existing = self.runtime_dir / "state.json"
        if existing.exists():
            pid = json.loads(existing.read_text()).get("pid", 0)
            if _alive(pid):
                raise HostError(f"a stack named {self.instance!r} is already running (pid {pid})", "stop it first, or pick another name with -p NAME")
        # Forked first, while this process has no thread and no event loop.
        self.fork_server = ForkServer.start()
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.root_dir.mkdir(exist_ok=True)
        self.record = StateRecord(self.runtime_dir)
        self.record.save()
        self.cgroups.setup()
        self.record.add("cgroups", str(self.cgroups.instance_path))
        joined = [name for name, plan in self.plans.items() if plan.net == "join"]
        if joined or self.stack.networks:
            self._prepare_networks(joined)
        self.sockets = bind_sockets(self.stack.sockets, self.record, self._inside)
        for service in self.stack.services:
            cgroup = self.cgroups.create(service.name)
            self.record.add("cgroups", str(cgroup.path))
            r, w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(r, False)
            self.services[service.name] = ServiceRuntime(service, self.plans[service.name], cgroup, r, w)

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
        shutil.rmtree(self.runtime_dir / "etc", ignore_errors=True)
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

        started = time.monotonic()
        for rt in self.services.values():
            self._launch(rt)
        await self._first_of(asyncio.gather(*(rt.settled.wait() for rt in self.services.values())), stop_requested.wait())
        self._print_summary(time.monotonic() - started)
        await self._first_of(stop_requested.wait(), self.done.wait())
        if stop_requested.is_set():
            self.console.note("stopping all services")
        await self._stop_all()
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
        rt.cgroup.renew()
        rt.launch_id = self.fork_server.next_id()
        self.by_launch[rt.launch_id] = rt
        fds = [self.sockets[key].sock.fileno() for key in rt.plan.fd_sockets]
        rt.requested_ns = time.monotonic_ns()
        netns = self.namespaces.fds[rt.spec.name] if rt.plan.net == "join" and self.namespaces else -1
        rt.channel = self.fork_server.send_launch(
            rt.launch_id, rt.plan, str(rt.cgroup.path), rt.cgroup.extra_procs_files, str(self.root_dir), rt.output_w, fds, netns
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
                    self._transition(rt, State.RUNNING, f"pid {rt.pid}")
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
        clean, text = describe_status(status)
        if rt.launch_error is not None:
            clean, text = False, f"could not start: {rt.launch_error.step}: {rt.launch_error.detail}"
        match rt.state:
            case State.STOPPING:
                self._transition(rt, State.STOPPED, text)
            case State.STARTING | State.RUNNING:
                self._after_unexpected_exit(rt, clean, text)
            case _:
                pass
        rt.settled.set()
        self._check_done()

    def _after_unexpected_exit(self, rt: ServiceRuntime, clean: bool, text: str) -> None:
        policy = rt.spec.restart
        if self.stopping or policy == "no" or (policy == "on-failure" and clean):
            self._transition(rt, State.EXITED if clean else State.FAILED, text)
            return
        now = time.monotonic()
        rt.recent_failures.append(now)
        while rt.recent_failures and now - rt.recent_failures[0] > START_LIMIT_INTERVAL:
            rt.recent_failures.popleft()
        if len(rt.recent_failures) >= START_LIMIT_BURST:
            self._transition(
                rt, State.FAILED, f"{text}; gave up after {START_LIMIT_BURST} restarts within {START_LIMIT_INTERVAL:g} s (the others keep running)"
            )
            return
        delay = min(rt.spec.restart_delay * 2 ** (len(rt.recent_failures) - 1), MAX_RESTART_DELAY)
        self._transition(rt, State.BACKOFF, f"{text}; restarting in {delay:g} s")
        rt.restarts += 1
        rt.timer = asyncio.get_running_loop().call_later(delay, self._restart_after_backoff, rt)

    def _restart_after_backoff(self, rt: ServiceRuntime) -> None:
        rt.timer = None
        if rt.state is State.BACKOFF and not self.stopping:
            self._launch(rt)

    def _transition(self, rt: ServiceRuntime, new: State, reason: str) -> None:
        old, rt.state = rt.state, new
        quiet = {(State.STOPPED, State.STARTING), (State.STARTING, State.RUNNING)} if not self.summary_printed else set()
        if (old, new) not in quiet:
            self.console.note(f"{rt.spec.name}: {old.value} -> {new.value}: {reason}")

    def _check_done(self) -> None:
        if all(rt.state in FINAL for rt in self.services.values()):
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
        if rt.state not in (State.STARTING, State.RUNNING):
            return
        self._transition(rt, State.STOPPING, f"sending {signal.Signals(rt.spec.stop_signal).name}")
        rt.settled.clear()
        if rt.pid and rt.channel is None:
            self._send_stop_signal(rt)

        def kill_after_timeout() -> None:
            if rt.state is State.STOPPING:
                self.console.note(f"{rt.spec.name}: did not stop within {rt.spec.stop_timeout:g} s; killing its cgroup")
                rt.cgroup.kill()

        rt.timer = asyncio.get_running_loop().call_later(rt.spec.stop_timeout, kill_after_timeout)
        await rt.settled.wait()

    async def _stop_all(self) -> None:
        self.stopping = True
        await asyncio.gather(*(self._stop(rt) for rt in self.services.values()))

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
            where = f"pid {rt.pid}" if rt.state is State.RUNNING else rt.state.value
            self.console.note(f"  {rt.spec.name}: {where}; {self._describe_network(rt)}; " + ("; ".join(socks + uses) or "no sockets"))
        self.summary_printed = True
        for name, line in self.held_output:
            self.console.line(name, line)
        self.held_output.clear()


def instance_name(stack: Stack, project: str | None) -> str:
    name = project or stack.name
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "stack"
    return cleaned


def runtime_path(instance: str) -> Path:
    return RUNTIME_ROOT / instance
