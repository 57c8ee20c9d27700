"""Stopping a service: stop_signal to its sandbox's init, SIGKILL to its whole cgroup after
stop_timeout; and killing one that failed while running (start_timeout, watchdog, health check),
whose exit is then judged by the verdict, not by how it died."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from sandboxd.daemon.console import Console
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.runtime import ServiceRuntime, Verdict
from sandboxd.daemon.states import ALIVE, Event, State
from sandboxd.host.cgroups import Cgroup


def signal_init(pidfd: int, cgroup: Cgroup, sig: int) -> None:
    """`sig` to a sandbox's init through its pidfd; before it has one, SIGKILL to its whole cgroup."""
    try:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            cgroup.kill()
    except ProcessLookupError:
        pass


def fail(machine: ServiceMachine, rt: ServiceRuntime, event: Event, verdict: Verdict) -> None:
    """A running service failed (`event`): it is killed (the KILL action) and its exit judged by `verdict`."""
    rt.launch.verdict = verdict
    machine.transition(rt, event, f"{verdict.why}; sending {signal.Signals(verdict.signal).name}")


class Stopper:
    def __init__(self, machine: ServiceMachine, console: Console, unwatch: Callable[[ServiceRuntime], None]) -> None:
        self.machine = machine
        self.console = console
        self.unwatch = unwatch  # stop watching a service's sockets (activation.py)

    async def stop_by_hand(self, rt: ServiceRuntime) -> None:
        """`sandboxd stop`, or a reload: a waiting service just stops waiting."""
        self.unwatch(rt)
        if rt.state is State.WAITING:
            self.machine.transition(rt, Event.STOP, "stop requested")
            return
        await self.stop(rt)

    async def stop(self, rt: ServiceRuntime) -> None:
        """Stop the service, and return once it is stopped (or never ran)."""
        if rt.state is State.BACKOFF:
            self.machine.transition(rt, Event.STOP, "stop requested during restart delay")
            return
        if rt.state in (State.STOPPING, State.IDLE_STOPPING):
            await rt.settled.wait()
            return
        if rt.state not in ALIVE:
            return
        self.machine.transition(rt, Event.STOP, f"sending {signal.Signals(rt.spec.stop_signal).name}")
        await rt.settled.wait()

    def begin_stop(self, rt: ServiceRuntime) -> None:
        """The STOP action: stop_signal to the init now (or once the child has exec'd); SIGKILL to
        the whole cgroup after stop_timeout."""
        rt.timers.disarm()
        rt.settled.clear()
        if rt.launch.pid and rt.launch.channel is None:
            signal_init(rt.launch.pidfd, rt.cgroup, rt.spec.stop_signal)
        self._kill_later(rt, (State.STOPPING, State.IDLE_STOPPING), say=True)

    def kill(self, rt: ServiceRuntime) -> None:
        """The KILL action: the verdict's signal to the init; SIGKILL to the cgroup after stop_timeout."""
        assert rt.launch.verdict is not None
        rt.timers.disarm()
        signal_init(rt.launch.pidfd, rt.cgroup, rt.launch.verdict.signal)
        self._kill_later(rt, ALIVE, say=False)

    def _kill_later(self, rt: ServiceRuntime, states: tuple[State, ...], say: bool) -> None:
        """SIGKILL to the cgroup after stop_timeout, if this sandbox is still in one of `states` then."""
        launch_id = rt.launch.id

        def kill_after_timeout() -> None:
            if rt.launch.id == launch_id and rt.state in states:
                if say:
                    self.console.note(f"{rt.spec.name}: did not stop within {rt.spec.stop_timeout:g} s; killing its cgroup")
                rt.cgroup.kill()

        if rt.launch.kill_timer is not None:
            rt.launch.kill_timer.cancel()
        rt.launch.kill_timer = asyncio.get_running_loop().call_later(rt.spec.stop_timeout, kill_after_timeout)
