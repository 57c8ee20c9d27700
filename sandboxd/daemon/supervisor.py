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
import shutil
import signal
import statistics
import time
from collections.abc import Awaitable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from sandboxd.daemon.activation import Activation
from sandboxd.host.cgroups import CgroupHost, CgroupManager
from sandboxd.cli.client import RUNTIME_ROOT
from sandboxd.cli.client import alive as _alive
from sandboxd.daemon.console import Console
from sandboxd.daemon.control import ControlServer
from sandboxd.errors import HostError, LaunchError
from sandboxd.sandbox.handle import ForkServer, read_status
from sandboxd.sandbox.protocol import ForkFailed
from sandboxd.daemon.logs import LogFiles
from sandboxd.daemon.notify import NotifySocket
from sandboxd.daemon.operations import Operations
from sandboxd.host.pins import SourceFds, close_all, pin_own
from sandboxd.plan.launch import LaunchPlan, NetworkPlan, UserNamespace, uses_notify
from sandboxd.daemon.proxy import Proxies
from sandboxd.daemon.readiness import Readiness
from sandboxd.daemon.restart import Outcome, StartLimiter, classify, restart_delay, should_restart
from sandboxd.daemon.runtime import ALIVE, FINAL, Instance, ServiceRuntime, State
from sandboxd.host.sockets import BoundSocket, bind_sockets, close_sockets
from sandboxd.spec.model import Dependency, Limits, Service, Stack
from sandboxd.host.state import StateRecord

if TYPE_CHECKING:
    from sandboxd.host.network import Namespaces
    from sandboxd.host.subids import Lease

class Supervisor(Readiness, Activation, Operations, Proxies):
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
        pinned: dict[str, SourceFds] | None = None,
        ids: Lease | None = None,
    ) -> None:
        self.stack = stack
        self.ids = ids  # the block of subordinate ids the stack's user namespaces map to
        self.plans = plans
        self.pinned = pinned if pinned is not None else {}
        self.instance = instance
        self.runtime_dir = RUNTIME_ROOT / instance
        self.root_dir = self.runtime_dir / "root"
        self.cgroups = CgroupManager(cgroup_host, instance)
        self.console = console or Console([s.name for s in stack.services])
        self.record: StateRecord | None = None
        self.fork_server = fork_server
        self.limits = limits if limits is not None else {s.name: s.limits for s in stack.services}
        self.detached = detached
        self.owns_runtime = False
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
        self.commands: dict[int, asyncio.Future[int]] = {}  # commands run inside sandboxes (health checks, reload:)
        self.exec_count = 0
        self.proxy_tasks: set[asyncio.Future[None]] = set()  # watches that start proxies (proxy.py)
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

    def _claim_runtime_dir(self) -> None:
        """Make the stack's runtime directory, atomically: whoever made it owns the name. A second
        `up` with a running stack's name must leave everything of that stack alone."""
        RUNTIME_ROOT.mkdir(parents=True, exist_ok=True)
        try:
            self.runtime_dir.mkdir()
        except FileExistsError:
            try:
                pid = json.loads((self.runtime_dir / "state.json").read_text()).get("pid", 0)
            except (OSError, ValueError):
                pid = 0
            hint = "stop it first (sandboxd down -p NAME), or pick another name with -p NAME"
            if pid and not _alive(pid):
                hint = "a dead run left it behind: sandboxd down -p NAME removes it"
            raise HostError(f"a stack named {self.instance!r} exists already (pid {pid or 'unknown'})", hint) from None
        self.owns_runtime = True

    def _prepare(self) -> None:
        self._claim_runtime_dir()
        if self.fork_server is None:  # forked first, while this process has no thread and no event loop
            self.fork_server = ForkServer.start()
        self.root_dir.mkdir(exist_ok=True)
        self.record = StateRecord(self.runtime_dir)
        if self.ids is not None:
            self.record.userns = dataclasses.asdict(self.ids.userns)
        self.record.save()
        self.console.logs = LogFiles(self.runtime_dir / "logs")
        self.console.quiet = self.detached
        for warning in self.cgroups.setup():
            self.console.note(f"warning: {warning}")
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
        rt.sources = self.pinned.pop(service.name, {})
        if uses_notify(rt.spec):
            (self.runtime_dir / "notify").mkdir(exist_ok=True)
            rt.notify = NotifySocket(self.runtime_dir / "notify" / rt.spec.name)
        self.services[service.name] = rt
        self._pin_own(rt)
        return rt

    def _pin_own(self, rt: ServiceRuntime, paths: set[str] | None = None) -> None:
        """Hold the bind sources sandboxd made for the service itself (its notify socket, the
        hosts and resolv.conf of its networks, the socket files it uses), once they exist: those
        of `paths` anew (made anew by a reload), and every one not held yet."""
        for op in rt.plan.mounts:
            if op.kind != "bind" or (op.source in rt.sources and (paths is None or op.source not in paths)):
                continue
            try:
                fd = pin_own(op.source)
            except OSError as e:
                raise HostError(f"{rt.spec.name}: cannot open {op.source}, which sandboxd made for it: {e.strerror}", "is something else removing files there?") from None
            if op.source in rt.sources:
                os.close(rt.sources[op.source])
            rt.sources[op.source] = fd

    def _source_fds(self, rt: ServiceRuntime) -> list[int]:
        """The held source of each bind mount of the service, in the order of its plan."""
        return [rt.sources[op.source] for op in rt.plan.mounts if op.kind == "bind"]

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
        close_all(rt.sources)
        self.cgroups.remove(rt.cgroup)
        del self.services[rt.spec.name]

    def _prepare_networks(self, joined: list[str]) -> None:
        from sandboxd.host.network import Namespaces, allocation_lock, build_networks, choose_subnets
        from sandboxd.plan.launch import RESOLV_CONF, hosts_file, plan_networks

        assert self.record is not None
        self.namespaces = Namespaces()
        with allocation_lock():
            subnets = choose_subnets(self.stack, self.runtime_dir)
            self.record.subnets = [cidr for cidrs in subnets.values() for cidr in cidrs]
            self.record.save()
        self.networks = plan_networks(self.stack, subnets)
        for name in joined:
            self.namespaces.create(name, loopback=self.stack.service(name).network != "none", for_userns=self.plans[name].userns is not None)
        for service in self.stack.services:
            if service.attachments:
                etc = self.runtime_dir / "etc" / service.name
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(hosts_file(service, self.networks))
                (etc / "resolv.conf").write_text(RESOLV_CONF)
        build_networks(self.namespaces, self.networks)

    def _stack_userns(self, stack: Stack) -> UserNamespace | None:
        """The stack's block of ids (leased when a reload brings its first user namespace)."""
        if self.ids is None and any(service.userns for service in stack.services):
            from sandboxd.host.subids import lease

            self.ids = lease(self.instance)
            assert self.record is not None
            self.record.userns = dataclasses.asdict(self.ids.userns)
            self.record.save()
        return self.ids.userns if self.ids is not None else None

    def _inside(self, service: str | None) -> AbstractContextManager[None]:
        if service is None or self.namespaces is None:
            return nullcontext()
        return self.namespaces.inside(service)

    def _cleanup(self) -> None:
        if self.fork_server is not None:
            self.fork_server.stop()
        for fds in self.pinned.values():
            close_all(fds)
        if not self.owns_runtime:
            return  # nothing of ours was made: the name belongs to another stack
        if self.namespaces is not None:
            self.namespaces.close()  # the kernel frees the namespaces, with their links and bridges
        for rt in self.services.values():
            for fd in (rt.output_r, rt.output_w, rt.pidfd, rt.bind_listener):
                if fd >= 0:
                    os.close(fd)
            if rt.channel is not None:
                rt.channel.close()
            close_all(rt.sources)
        if self.record is not None:
            close_sockets(self.sockets, self.record)
        self.cgroups.teardown()
        for path in (self.runtime_dir / "state.json", self.runtime_dir / "state.json.tmp"):
            path.unlink(missing_ok=True)
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
        rt.handed_off = set()
        if rt.limiter is None:
            rt.limiter = StartLimiter(rt.spec)
        rt.limiter.record(time.monotonic())
        try:
            rt.cgroup.renew()
        except OSError as e:
            self._transition(rt, State.FAILED, f"its cgroup could not be renewed: {e.strerror} ({e.filename})")
            rt.settled.set()
            self._check_done()
            return
        rt.cgroup.mark()
        rt.launch_id = self.fork_server.next_id()
        self.by_launch[rt.launch_id] = rt
        fds = [self.sockets[key].sock.fileno() for key in rt.plan.fd_sockets]
        plan = self._with_stored_fds(rt)
        fds += [stored.fd for stored in rt.fdstore]
        rt.requested_ns = time.monotonic_ns()
        netns = self.namespaces.fds[rt.spec.name] if rt.plan.net == "join" and self.namespaces else -1
        rt.channel = self.fork_server.send_launch(
            rt.launch_id, plan, str(rt.cgroup.path), rt.cgroup.extra_procs_files, str(self.root_dir), rt.output_w, fds, netns, self._source_fds(rt)
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
                if launched.listener >= 0:
                    self._watch_binds(rt, launched.listener)
                continue
            if kind == "done":
                self._close_channel(rt)
                if rt.launch_error is None and rt.state is State.STARTING:
                    rt.started_at = time.monotonic()
                    rt.main_pid = 0
                    waiting = {"notify": " (waiting for READY=1)", "started": ""}.get(str(rt.spec.ready), " (waiting for its health check)")
                    self._transition(rt, State.RUNNING, f"pid {rt.pid}{waiting}")
                    self._arm_timers(rt)
                    self._start_proxies(rt)
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
            reply = self.fork_server.receive()
        except BlockingIOError:
            return
        if reply is None:
            asyncio.get_running_loop().remove_reader(self.fork_server.conn)
            self.console.note("the fork server died; stopping")
            for rt in self.services.values():
                rt.cgroup.kill()
            os.kill(os.getpid(), signal.SIGTERM)
            return
        launch_id = reply.id
        if launch_id in self.commands:
            if not self.commands[launch_id].done():
                self.commands[launch_id].set_result(reply.wait_status)
            return
        instance = self.instances.pop(launch_id, None)
        if instance is not None:
            self._on_instance_exit(instance, reply.wait_status)
            return
        launched = self.by_launch.pop(launch_id, None)
        if launched is None:
            return
        if isinstance(reply, ForkFailed):
            launched.launch_error = LaunchError(launched.spec.name, "fork", reply.detail)
        self._on_exit(launched, reply.wait_status)

    def _on_exit(self, rt: ServiceRuntime, status: int) -> None:
        if rt.channel is not None:
            self._on_status(rt)  # the exit may be seen before the status channel's last words
            self._close_channel(rt)
        if rt.pidfd >= 0:
            os.close(rt.pidfd)
            rt.pidfd = -1
        self._unwatch_binds(rt)
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
            for key in rt.plan.proxied:
                socks.append(f"{self.sockets[key].real_address()} (forwarded to {next(s for s in self.stack.sockets if s.name == key[0]).proxy})")
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


def runtime_path(instance: str) -> Path:
    return RUNTIME_ROOT / instance
