"""The supervisor: binds the sockets, launches every sandbox at once, restarts, stops, cleans up.

One asyncio loop, no threads. Each service's life is the table in states.py (drawn in its
docstring): every change of state goes through machine.py, which refuses what the table does not
have and logs every transition once with its reason. The sockets are bound before the first
sandbox exists and stay open until the stack is down.

This module puts the collaborators together and runs the loop; each has one job and is handed
the few others it calls:

    resources.py     the host's part: runtime directory, state record, cgroups, networks, sockets; cleanup
    runtimes.py      each service's runtime record: its cgroup, output pipe, notify socket, held sources
    machine.py       the state table, enforced; its actions bound here to the collaborators below
    lifecycle.py     launch, the status channel, the exit judged (restart.py), the restart delay
    stopping.py      stop_signal, SIGKILL after stop_timeout; the kill of a failed service
    readiness.py     sd_notify: READY=1, STATUS=, the watchdog, start_timeout; the fd store
    health.py        health checks run inside the sandbox
    idle.py          idle_stop (scale to zero)
    activation.py    on-demand start and one sandbox per connection
    proxy.py         proxies to programs that bind their own address; handoff.py gives them the socket
    dependencies.py  after: dependencies, and the end of a foreground stack
    forks.py         requests to the fork server and their ends
    recovery.py      the fork server's death survived; a stop that always ends
    output.py        the services' output; summary.py, the start-up summary
    operations.py    the control socket's verbs (control.py); reload.py applies a changed spec
    upgrade.py       upgrade in place: the state record, its check, the exec; resume.py, the new side
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sandboxd.host.paths import RUNTIME_ROOT
from sandboxd.host.paths import alive as _alive
from sandboxd.daemon.activation import Activation
from sandboxd.daemon.console import Console
from sandboxd.daemon.control import ControlServer
from sandboxd.daemon.dependencies import Dependencies
from sandboxd.daemon.failures import failure_report
from sandboxd.daemon.forks import ForkServerLink
from sandboxd.daemon.health import HealthChecks
from sandboxd.daemon.handoff import BindHandoff
from sandboxd.daemon.idle import IdleStop
from sandboxd.daemon.lifecycle import Lifecycle
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.operations import Operations
from sandboxd.daemon.output import Output
from sandboxd.daemon.proxy import Proxies
from sandboxd.daemon.readiness import FdStore, Readiness
from sandboxd.daemon.recovery import ForkServerRecovery, StopBound, shield_from_oom_killer
from sandboxd.daemon.resources import StackResources
from sandboxd.daemon.runtime import RunningStack, ServiceRuntime
from sandboxd.daemon.runtimes import Runtimes
from sandboxd.daemon.states import Action, Event, State
from sandboxd.daemon.stopping import Stopper
from sandboxd.daemon.summary import print_summary
from sandboxd.daemon.tasks import Background, drop_stop_signals, held_back_at_the_end, signal_free_executor
from sandboxd.daemon.upgrade import Upgrade
from sandboxd.errors import HostError
from sandboxd.host.cgroups import CgroupHost, cgroup_manager
from sandboxd.host.pins import SourceFds
from sandboxd.plan.launch import LaunchPlan
from sandboxd.sandbox.handle import ForkServer
from sandboxd.spec.model import Limits, Stack

if TYPE_CHECKING:
    from sandboxd.daemon.reload import Reload
    from sandboxd.host.subids import Lease

RECORD_RETRY = 2.0  # seconds between attempts to write a state record the full disk refused


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
        pinned: dict[str, SourceFds] | None = None,
        ids: Lease | None = None,
    ) -> None:
        self.detached = detached
        self.console = console or Console([s.name for s in stack.services])
        limits = limits if limits is not None else {s.name: s.limits for s in stack.services}
        pinned = pinned if pinned is not None else {}
        self.running = RunningStack(stack, plans, limits, pinned, instance, RUNTIME_ROOT / instance)
        self.resources = StackResources(self.running, cgroup_manager(cgroup_host, instance), self.console, ids, RUNTIME_ROOT)
        self.link = ForkServerLink(fork_server)
        self.done = asyncio.Event()
        self.stop_requested = asyncio.Event()
        self.control: ControlServer | None = None  # once the loop runs
        self._compose()

    def _compose(self) -> None:
        """Each collaborator, given what it calls; then each action of the state table, bound to its doer."""
        console, running, link = self.console, self.running, self.link
        tasks = Background(console)
        self.machine = machine = ServiceMachine(console)
        self.dependencies = Dependencies(machine, running, self.done, self.detached)
        self.output = Output(console)
        fdstore = FdStore(console, running)
        self.readiness = Readiness(machine, console, fdstore)
        self.health = HealthChecks(machine, link, tasks, console)
        self.idle = IdleStop(machine, running)
        handoff = BindHandoff(running, console)
        self.proxies = Proxies(running, link, tasks, console)
        self.activation = Activation(machine, running, link, tasks, self.resources.cgroups, console)
        self.stopper = Stopper(machine, console, self.activation.unwatch)
        self.lifecycle = Lifecycle(machine, running, link, tasks, fdstore, handoff, self.dependencies, console, self.output)
        self.runtimes = Runtimes(running, self.resources, self.output, self.readiness)
        def reload() -> Reload:  # at the first reload of the spec: what applies one is imported then
            from sandboxd.daemon.reload import Reload

            return Reload(running, self.resources, self.runtimes, self.lifecycle, self.stopper, console)

        self.operations = Operations(running, self.resources, self.lifecycle, self.stopper, link, reload, console, self.stop_requested)
        self.recovery = ForkServerRecovery(running, link, tasks, console, self._held_by_fork_servers, self.stop_requested.set)
        self.stop_bound = StopBound(running, link, console)
        self.upgrade = Upgrade(self)
        self.operations.upgrader = self.upgrade.request
        machine.bind(
            {
                Action.LAUNCH: self.lifecycle.launch,
                Action.WATCH: self.activation.watch,
                Action.ARM: self._arm,
                Action.END_START_TIMEOUT: self.readiness.end_start_timeout,
                Action.KILL: self.stopper.kill,
                Action.STOP: self.stopper.begin_stop,
                Action.RESTART_LATER: self.lifecycle.restart_later,
                Action.CANCEL_RESTART: self.lifecycle.cancel_restart,
                Action.SETTLE: self._settle,
            },
            entered=self.dependencies.entered,
        )
        machine.failed_before_ready = self._report_failure

    def _report_failure(self, rt: ServiceRuntime) -> None:
        """In the foreground, a service that failed for good before it was ever ready is said at
        once, with the last lines of its output (as `up -d` says it); the others keep running, as
        compose's do. Detached, its log and `sandboxd ps` say it."""
        if self.detached or self.running.stopping:
            return
        for line in failure_report(rt.name, rt.state.label, rt.reason, self.running.runtime_dir / "logs"):
            self.console.note(line)

    def _held_by_fork_servers(self) -> list[int]:
        """What every fork server holds until it exits: the stack's lease of ids (cli/stack.py)."""
        return [self.resources.ids.fd] if self.resources.ids is not None else []

    def _arm(self, rt: ServiceRuntime) -> None:
        """The ARM action: the sandbox runs."""
        self.readiness.arm(rt)
        self.health.arm(rt)
        self.idle.arm(rt)
        self.proxies.start(rt)
        rt.settled.set()

    def _settle(self, rt: ServiceRuntime) -> None:
        """The SETTLE action: it will not start."""
        rt.settled.set()
        self.dependencies.check_done()

    # ── set-up and tear-down (synchronous, around the event loop) ──

    def run(self) -> int:
        """Bring the stack up in the foreground until SIGINT/SIGTERM or until every service is done."""
        try:
            self._prepare()
            return asyncio.run(held_back_at_the_end(self._main()))
        finally:
            self._end()

    def resume(self, control: socket.socket, restore: Callable[[], None]) -> int:
        """Run a stack an upgrade handed over (upgrade.py), its runtime rebuilt (resume.py):
        `restore` re-arms it in the loop; the control socket is the one inherited."""
        try:
            return asyncio.run(held_back_at_the_end(self._resumed(control, restore)))
        finally:
            self._end()

    def _end(self) -> None:
        drop_stop_signals()  # a Ctrl-C now must not cut the clean-up short and leave things behind
        if self.link.server is not None:
            self.link.server.stop()
        self.resources.cleanup()

    def _claim_runtime_dir(self) -> None:
        """Make the stack's runtime directory, atomically: whoever made it owns the name. A second
        `up` with a running stack's name must leave everything of that stack alone."""
        RUNTIME_ROOT.mkdir(parents=True, exist_ok=True)
        runtime_dir = self.running.runtime_dir
        try:
            runtime_dir.mkdir()
        except FileExistsError:
            try:
                pid = json.loads((runtime_dir / "state.json").read_text()).get("pid", 0)
            except (OSError, ValueError):
                pid = 0
            hint = "stop it first (sandboxd down -p NAME), or pick another name with -p NAME"
            if pid and not _alive(pid):
                hint = "a dead run left it behind: sandboxd down -p NAME removes it"
            raise HostError(f"a stack named {self.running.instance!r} exists already (pid {pid or 'unknown'})", hint) from None
        self.resources.owns_runtime = True

    def _prepare(self) -> None:
        self._claim_runtime_dir()
        if self.link.server is None:  # forked first, while this process has no thread and no event loop
            self.link.server = ForkServer.start()
        why = shield_from_oom_killer()  # after the fork server's fork: it starts at 0, and puts itself back to 0 anyway
        self.resources.prepare(self.detached)
        if why and self.console.logs is not None:  # in the log only: the host decides (CAP_SYS_RESOURCE)
            self.console.logs.write("sandboxd", f"not shielded from the OOM killer: {why}")
        for service in self.running.stack.services:
            self.runtimes.add(service)

    # ── the event loop ──

    async def _main(self) -> int:
        control = await self._serve(None)
        started = time.monotonic()
        self._start_all()
        settled = asyncio.gather(*(rt.settled.wait() for rt in self.running.services.values()))
        await _first_of(settled, self.stop_requested.wait())
        print_summary(self.console, self.running, time.monotonic() - started)
        self.machine.quiet_starts = False
        self.output.release()
        return await self._until_down(control)

    async def _resumed(self, sock: socket.socket, restore: Callable[[], None]) -> int:
        control = await self._serve(sock)
        self.machine.quiet_starts = False
        self.output.release()
        restore()
        return await self._until_down(control)

    async def _serve(self, sock: socket.socket | None) -> ControlServer:
        """The control socket (bound now, or inherited), the signals, the fork server's replies,
        each service's output and notify messages."""
        loop = asyncio.get_running_loop()
        self.control = control = ControlServer(self.operations, self.running.runtime_dir / "control.sock")
        await control.start(sock)
        loop.set_exception_handler(lambda loop, context: self._on_loop_exception(control, context))
        loop.set_default_executor(signal_free_executor())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        self.link.listen(self.recovery.on_death)
        self._save_unsaved_record()
        for rt in self.running.services.values():
            self.runtimes.attach(rt)
        return control

    async def _until_down(self, control: ControlServer) -> int:
        await _first_of(self.stop_requested.wait(), self.done.wait())
        if self.stop_requested.is_set():
            self.console.note("stopping all services")
        await self._stop_all()
        self.stop_bound.disarm()
        await control.close()
        for rt in self.running.services.values():
            self.output.drain(rt)
        self.link.close()
        if self.recovery.gave_up:
            return 1
        if self.stop_requested.is_set():
            return 0
        return 1 if any(rt.state is State.FAILED for rt in self.running.services.values()) else 0

    def _save_unsaved_record(self) -> None:
        """A state record that could not be written (the runtime directory was full) is written
        again, whole, once there is room: looked at every RECORD_RETRY seconds."""
        record = self.resources.record
        if record is not None and record.unsaved:
            record.save()
            if not record.unsaved:
                self.console.note("the state file is written again")
        asyncio.get_running_loop().call_later(RECORD_RETRY, self._save_unsaved_record)

    def _on_loop_exception(self, control: ControlServer, context: dict[str, object]) -> None:
        """asyncio's accept of the control socket ran out of descriptors (EMFILE): it stops
        accepting for a second and tries again; said once until a client is served again."""
        if context.get("message") == "socket.accept() out of system resource":
            if not control.short_of_descriptors:
                control.short_of_descriptors = True
                self.console.note(f"control socket: cannot accept a connection ({context.get('exception')}); trying again every second")
            return
        asyncio.get_running_loop().default_exception_handler(context)

    def _start_all(self) -> None:
        """Every service at once: those fed by a connection wait for it, those with `after:` for that.
        Their launches go to the fork server together, in as few messages as they fit in."""
        server = self.link.server
        if server is not None:
            server.hold_back()
        try:
            self._start_each()
        finally:
            if server is not None:
                server.send_held()

    def _start_each(self) -> None:
        for rt in self.running.services.values():
            if rt.per_connection or rt.spec.start == "on-demand":
                self.lifecycle.start(rt)
                rt.settled.set()
            elif rt.spec.after:
                waits = ", ".join(f"{d.service} ({d.condition})" for d in rt.spec.after)
                self.machine.transition(rt, Event.DEFER, f"waits for {waits}")
                rt.settled.set()
            else:
                self.lifecycle.start(rt)

    def _on_signal(self) -> None:
        """SIGINT or SIGTERM: stop the stack; a second one (Ctrl-C again, or `kill` again of a
        detached supervisor that is already stopping): kill every cgroup now."""
        if self.stop_requested.is_set():
            self.console.note("second interrupt: killing every service now")
            self.running.stopping = True
            for rt in self.running.services.values():
                rt.cgroup.kill()
            self.stop_bound.arm(after_kill=True)
        self.stop_requested.set()

    async def _stop_all(self) -> None:
        self.running.stopping = True
        if self.stop_bound.timer is None:
            self.stop_bound.arm()
        for rt in self.running.services.values():
            self.activation.unwatch(rt)
            if rt.state is State.WAITING:
                self.machine.transition(rt, Event.STOP, "stop requested")
        await asyncio.gather(*(self.stopper.stop(rt) for rt in self.running.services.values()), self.activation.stop_instances())


async def _first_of(*awaitables: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
