"""Health checks: a command run inside the service's sandbox (`ready: {exec: ...}`). Until the
service is ready it runs soon and often; the first success makes it ready; once ready, `retries`
failures in a row make it unhealthy, and it is killed as a watchdog failure would be."""

from __future__ import annotations

import asyncio
import os
import time

from sandboxd.daemon.console import Console
from sandboxd.daemon.forks import ForkServerLink
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.restart import classify
from sandboxd.daemon.runtime import HEALTH_FIRST_CHECK, ServiceRuntime, Verdict
from sandboxd.daemon.states import Event, State
from sandboxd.daemon.stopping import fail
from sandboxd.daemon.tasks import Background
from sandboxd.spec.model import HealthCheck


class HealthChecks:
    def __init__(self, machine: ServiceMachine, link: ForkServerLink, tasks: Background, console: Console) -> None:
        self.machine = machine
        self.link = link
        self.tasks = tasks
        self.console = console

    def arm(self, rt: ServiceRuntime) -> None:
        """Its sandbox runs: the first check comes soon."""
        if isinstance(rt.spec.ready, HealthCheck):
            rt.health.failures = 0
            rt.timers.health = asyncio.get_running_loop().call_later(HEALTH_FIRST_CHECK, self._run, rt)

    def _run(self, rt: ServiceRuntime) -> None:
        rt.timers.health = None
        check = rt.spec.ready
        assert isinstance(check, HealthCheck)
        if rt.state not in (State.RUNNING, State.READY) or rt.health.probe is not None or not rt.launch.pid:
            return
        rt.health.probe = self.tasks.spawn(self._probe(rt, check), f"{rt.spec.name}: the health check")

    async def _probe(self, rt: ServiceRuntime, check: HealthCheck) -> None:
        status = await self.link.run_inside(rt, list(check.exec), check.timeout)
        rt.health.probe = None
        if rt.state not in (State.RUNNING, State.READY):
            return
        if status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            rt.health.failures = 0
            if rt.state is State.RUNNING:
                self.machine.transition(rt, Event.READY, f"health check passed after {time.monotonic() - rt.launch.started_at:.3f} s")
        elif rt.state is State.READY:
            rt.health.failures += 1
            text = classify(status)[1] if status is not None else f"no answer within {check.timeout:g} s"
            self.console.note(f"{rt.spec.name}: health check failed ({text}), {rt.health.failures} of {check.retries}")
            if rt.health.failures >= check.retries:
                why = f"unhealthy: health check failed {check.retries} times in a row"
                fail(self.machine, rt, Event.UNHEALTHY, Verdict("watchdog", why, rt.spec.stop_signal))
                return
        delay = check.interval if rt.state is State.READY else min(check.interval, HEALTH_FIRST_CHECK * 2)
        rt.timers.health = asyncio.get_running_loop().call_later(delay, self._run, rt)
