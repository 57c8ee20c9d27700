"""Scale to zero (`idle_stop`): an on-demand service that has been idle that long is stopped, and
its sockets are watched again for the next connection.

Idle means: no connection waiting on its sockets, no CPU used, and no socket open in its cgroup
besides the listening ones (a client still connected keeps it running)."""

from __future__ import annotations

import asyncio
import select
import time

from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.runtime import RunningStack, ServiceRuntime
from sandboxd.daemon.states import Event


class IdleStop:
    def __init__(self, machine: ServiceMachine, running: RunningStack) -> None:
        self.machine = machine
        self.running = running

    def arm(self, rt: ServiceRuntime) -> None:
        """Its sandbox runs: look at it five times per idle_stop."""
        if rt.spec.idle_stop > 0 and rt.spec.start == "on-demand":
            rt.idle.last_activity, rt.idle.last_usage = time.monotonic(), -1
            period = max(rt.spec.idle_stop / 5, 0.05)
            rt.timers.idle = asyncio.get_running_loop().call_later(period, self._check, rt, period)

    def _check(self, rt: ServiceRuntime, period: float) -> None:
        rt.timers.idle = None
        if not self.machine.allows(rt, Event.IDLE):
            return
        now = time.monotonic()
        usage = rt.cgroup.cpu_usage_usec()
        listening = [self.running.sockets[key].sock for key in rt.plan.fd_sockets + rt.plan.proxied]
        pending = bool(select.select(listening, [], [], 0)[0])
        if pending or usage != rt.idle.last_usage or rt.cgroup.holds_sockets_besides(listening):
            rt.idle.last_activity, rt.idle.last_usage = now, usage
        if now - rt.idle.last_activity >= rt.spec.idle_stop:
            self.machine.transition(rt, Event.IDLE, f"idle for {rt.spec.idle_stop:g} s")
            return
        rt.timers.idle = asyncio.get_running_loop().call_later(period, self._check, rt, period)
