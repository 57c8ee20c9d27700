"""A service's sandbox from the request to the exit: launched through the fork server, followed
on its status channel until the child execs, and its exit judged by restart.py's rules, which pick
the exit event of the state table: restart after a delay, wait for the next connection, or end."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable

from sandboxd.daemon.console import Console
from sandboxd.daemon.dependencies import Dependencies
from sandboxd.daemon.forks import Ended, ForkServerLink, Sent
from sandboxd.daemon.handoff import BindHandoff
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.output import Output
from sandboxd.daemon.readiness import FdStore
from sandboxd.daemon.restart import Outcome, StartLimiter, classify, exit_details, restart_delay, should_restart
from sandboxd.daemon.runtime import ExitStatus, Launch, RunningStack, ServiceRuntime
from sandboxd.daemon.states import FINAL, Event, State
from sandboxd.daemon.stopping import signal_init
from sandboxd.daemon.tasks import Background
from sandboxd.errors import LaunchError
from sandboxd.sandbox.handle import read_status


class Lifecycle:
    def __init__(
        self,
        machine: ServiceMachine,
        running: RunningStack,
        link: ForkServerLink,
        tasks: Background,
        fdstore: FdStore,
        handoff: BindHandoff,
        dependencies: Dependencies,
        console: Console,
        output: Output,
    ) -> None:
        self.machine = machine
        self.running = running
        self.link = link
        self.tasks = tasks
        self.fdstore = fdstore
        self.handoff = handoff
        self.dependencies = dependencies
        self.console = console
        self.output = output

    # ── starting ──

    def start(self, rt: ServiceRuntime) -> None:
        """Start it now, or watch its sockets when a connection starts it."""
        if rt.per_connection or rt.spec.start == "on-demand":
            what = "one sandbox per connection" if rt.per_connection else "the first connection"
            self.machine.transition(rt, Event.WAIT, f"starts on {what}")
        else:
            self.machine.transition(rt, Event.START, rt.restarts.reason())

    def start_by_hand(self, rt: ServiceRuntime) -> None:
        """`sandboxd start` (or a reload's new service): only from a state it is not going anywhere from."""
        if rt.state not in (*FINAL, State.PENDING) or self.running.stopping:
            return
        rt.restarts.limiter = StartLimiter(rt.spec)  # a start by hand begins a new start-limit interval
        self.start(rt)

    def launch(self, rt: ServiceRuntime) -> None:
        """The LAUNCH action: ask the fork server for a sandbox, with the same sockets as ever."""
        rt.launch = Launch(started_at=rt.launch.started_at)  # the last run's start, until this one runs
        rt.handoff.handed_off = set()
        rt.restarts.limiter.record(time.monotonic())
        try:
            rt.cgroup.renew()
        except OSError as e:
            self.machine.transition(rt, Event.SETUP_FAILED, f"its cgroup could not be renewed: {e.strerror} ({e.filename})")
            return
        rt.cgroup.mark()
        fds = [self.running.sockets[key].sock.fileno() for key in rt.plan.fd_sockets]
        plan = self.fdstore.with_stored_fds(rt)
        fds += [stored.fd for stored in rt.fdstore]
        rt.launch.requested_ns = time.monotonic_ns()
        netns, sources, root = self.running.netns_fd(rt), rt.source_fds(), str(self.running.root_dir)
        sent = self.link.send(
            lambda server, request_id: server.send_launch(
                request_id, plan, str(rt.cgroup.path), rt.cgroup.v1_tasks_files, root, rt.output.w, fds, netns, sources
            )
        )
        rt.launch.id, rt.launch.channel = sent.id, sent.channel
        # By its number: asyncio formats the repr of an object it is given to look it up first.
        asyncio.get_running_loop().add_reader(sent.channel.fileno(), self._on_status, rt)
        self.tasks.spawn(self._follow(rt, sent), f"{rt.spec.name}: following its sandbox")

    def _on_status(self, rt: ServiceRuntime) -> None:
        assert rt.launch.channel is not None
        while True:
            try:
                kind, launched = read_status(rt.launch.channel, rt.spec.name)
            except LaunchError as e:
                rt.launch.error = e
                continue
            if kind == "pending":
                if launched is None:
                    return  # nothing more to read yet
                rt.launch.pid, rt.launch.pidfd, rt.launch.exec_ns = launched.pid, launched.pidfd, launched.exec_ns
                if launched.listener >= 0:
                    self.handoff.watch(rt, launched.listener)
                continue
            if kind == "done":
                self._close_channel(rt)
                if rt.launch.error is None and rt.state is State.STARTING:
                    rt.launch.started_at = time.monotonic()
                    rt.notify.main_pid = 0
                    waiting = {"notify": " (waiting for READY=1)", "started": ""}.get(str(rt.spec.ready), " (waiting for its health check)")
                    self.machine.transition(rt, Event.LAUNCHED, f"pid {rt.launch.pid}{waiting}")
                elif rt.state is State.STOPPING and rt.launch.pid and rt.launch.error is None:
                    signal_init(rt.launch.pidfd, rt.cgroup, rt.spec.stop_signal)
            return

    def _close_channel(self, rt: ServiceRuntime) -> None:
        if rt.launch.channel is not None:
            asyncio.get_running_loop().remove_reader(rt.launch.channel)
            rt.launch.channel.close()
            rt.launch.channel = None

    # ── the exit ──

    async def _follow(self, rt: ServiceRuntime, sent: Sent) -> None:
        self._on_exit(rt, await self.link.ended(sent))

    def adopt(self, rt: ServiceRuntime, end: Awaitable[Ended]) -> None:
        """Follow a sandbox an upgrade carried over (resume.py): its exit is judged as ever."""
        self.tasks.spawn(self._adopted(rt, end), f"{rt.spec.name}: following its sandbox")

    async def _adopted(self, rt: ServiceRuntime, end: Awaitable[Ended]) -> None:
        self._on_exit(rt, await end)

    def _on_exit(self, rt: ServiceRuntime, ended: Ended) -> None:
        if ended.failure:
            rt.launch.error = LaunchError(rt.spec.name, "fork", ended.failure)
        self.output.read_waiting(rt)  # its last words are in its log before its exit is said
        self._release_sandbox(rt)
        outcome, text, usage = self._judge(rt, ended.status)
        if ended.server_died:
            self._after_fork_server_death(rt, text)
            rt.settled.set()
            self.dependencies.check_done()
            return
        match rt.state:
            case State.IDLE_STOPPING if not self.running.stopping:
                self.machine.transition(rt, Event.EXIT_REARM, f"{text}; waiting for the next connection")
            case State.STOPPING | State.IDLE_STOPPING:
                self.machine.transition(rt, Event.EXIT_STOPPED, text)
            case State.STARTING | State.RUNNING | State.READY | State.RELOADING:
                self._after_unexpected_exit(rt, outcome, text)
            case _:
                pass
        if rt.state in FINAL:
            self.console.note(f"{rt.spec.name}: used {usage}")
        rt.settled.set()
        self.dependencies.check_done()

    def _release_sandbox(self, rt: ServiceRuntime) -> None:
        """What was the sandbox's goes: its status channel, pidfd, bind() listener, kill timer and
        timers, and whatever is left in its cgroup."""
        if rt.launch.channel is not None:
            self._on_status(rt)  # the exit may be seen before the status channel's last words
            self._close_channel(rt)
        if rt.launch.pidfd >= 0:
            os.close(rt.launch.pidfd)
            rt.launch.pidfd = -1
        self.handoff.unwatch(rt)
        if rt.launch.kill_timer is not None:
            rt.launch.kill_timer.cancel()
            rt.launch.kill_timer = None
        if rt.cgroup.populated():
            rt.cgroup.kill()  # the namespace's init is gone; make sure nothing else is left either
        rt.timers.disarm()

    def _judge(self, rt: ServiceRuntime, status: int) -> tuple[Outcome, str, str]:
        """How it ended, in words, and what it used: a failed set-up or sandboxd's verdict outweighs
        the wait status."""
        outcome, text = classify(status)
        rt.launch.exit = ExitStatus(*exit_details(status)) if rt.launch.error is None else None
        why = rt.cgroup.why_failed()
        if why:
            text = f"{why}; {text}"
        usage = _usage(rt)
        if rt.launch.error is not None:
            outcome, text = "exit-code", f"could not start: {rt.launch.error.step}: {rt.launch.error.detail}"
        if rt.launch.verdict is not None:
            outcome, why = rt.launch.verdict.outcome, rt.launch.verdict.why
            text = f"{why}; {text}"
            rt.launch.verdict = None
        if rt.notify.errno:
            text += f" (ERRNO={rt.notify.errno}: {os.strerror(rt.notify.errno)})"
            rt.notify.errno = 0
        return outcome, text, usage

    def _after_unexpected_exit(self, rt: ServiceRuntime, outcome: Outcome, text: str) -> None:
        if self.running.stopping or not should_restart(rt.spec.restart, outcome):
            if rt.spec.start == "on-demand" and not self.running.stopping:
                # Socket activation: the socket is watched again, as systemd re-arms a .socket unit.
                self.machine.transition(rt, Event.EXIT_REARM, f"{text}; waiting for the next connection")
                return
            self.machine.transition(rt, Event.EXIT_SUCCESS if outcome == "success" else Event.EXIT_FAILURE, text)
            return
        if rt.restarts.limiter.exhausted(time.monotonic()):
            limit = rt.spec.start_limit
            reason = f"{text}; gave up after {limit.burst} starts within {limit.interval:g} s (start_limit; the others keep running)"
            self.machine.transition(rt, Event.EXIT_FAILURE, reason)
            return
        delay = restart_delay(rt.spec, rt.restarts.limiter.in_a_row)
        self.machine.transition(rt, Event.EXIT_RESTART, f"{text}; restarting in {delay:g} s")

    def _after_fork_server_death(self, rt: ServiceRuntime, text: str) -> None:
        """Its sandbox died with the fork server (recovery.py): a final state with the reason,
        then, with a new fork server, started again as its `restart:` says (an on-demand or
        idle-stopped one waits for the next connection again)."""
        was = rt.state
        if not self.machine.allows(rt, Event.FORK_SERVER_DIED):
            return
        again = self.link.server is not None and not self.running.stopping
        on_demand = rt.spec.start == "on-demand" or was is State.IDLE_STOPPING
        restart = again and was is not State.STOPPING and (on_demand or should_restart(rt.spec.restart, "signal"))
        reason = f"its sandbox died with sandboxd's fork server ({text})"
        if again and not restart and was is not State.STOPPING:
            reason += f"; not started again (restart: {rt.spec.restart})"
        self.machine.transition(rt, Event.FORK_SERVER_DIED, reason)
        if not restart:
            return
        if on_demand:
            self.machine.transition(rt, Event.WAIT, "waiting for the next connection, with a new fork server")
            return
        rt.restarts.count += 1
        self.machine.transition(rt, Event.START, f"{rt.restarts.reason()}, with a new fork server")

    # ── restarting ──

    def restart_later(self, rt: ServiceRuntime) -> None:
        """The RESTART_LATER action: after restart_delay, the same sockets and a new sandbox."""
        rt.restarts.count += 1
        delay = restart_delay(rt.spec, rt.restarts.limiter.in_a_row)
        rt.restarts.timer = asyncio.get_running_loop().call_later(delay, self._restart_after_backoff, rt)

    def restart_at(self, rt: ServiceRuntime, when: float) -> None:
        """In backoff when an upgrade carried it over: the restart when it was due (loop time)."""
        rt.restarts.timer = asyncio.get_running_loop().call_at(when, self._restart_after_backoff, rt)

    def cancel_restart(self, rt: ServiceRuntime) -> None:
        """The CANCEL_RESTART action."""
        if rt.restarts.timer is not None:
            rt.restarts.timer.cancel()
            rt.restarts.timer = None

    def _restart_after_backoff(self, rt: ServiceRuntime) -> None:
        rt.restarts.timer = None
        if rt.state is State.BACKOFF and not self.running.stopping:
            self.machine.transition(rt, Event.DELAY_ELAPSED, rt.restarts.reason())


def _usage(rt: ServiceRuntime) -> str:
    stats = rt.cgroup.stats()
    parts = [f"cpu {stats['cpu_usec'] / 1e6:.2f} s"]
    if "memory_peak" in stats:
        parts.append(f"memory peak {stats['memory_peak'] / (1 << 20):.1f} MiB")
    return ", ".join(parts)

