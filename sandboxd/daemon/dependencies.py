"""`after:` dependencies, for what cannot go through a socket (a migration that must complete, a
service that must be ready), and the end of a foreground stack once every service is done."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.runtime import RunningStack
from sandboxd.daemon.states import FINAL, Event, State
from sandboxd.spec.model import Dependency

RELEASING = (State.RUNNING, State.READY, State.EXITED, State.FAILED, State.WAITING)  # may meet a condition


class Dependencies:
    def __init__(self, machine: ServiceMachine, running: RunningStack, done: asyncio.Event, detached: bool) -> None:
        self.machine = machine
        self.running = running
        self.done = done  # set when every service is done (not for a detached stack)
        self.detached = detached
        self.holds = 0  # verbs under way that stop services to start them again (held())

    def entered(self, state: State) -> None:
        """A service entered `state`: once the loop is free, see whether a pending one may start."""
        if state in RELEASING:
            asyncio.get_running_loop().call_soon(self.release)

    def release(self) -> None:
        if self.running.stopping:
            return
        for rt in self.running.services.values():
            if rt.state is not State.PENDING:
                continue
            results = [(dep, self._condition(dep)) for dep in rt.spec.after]
            broken = [dep for dep, met in results if met is None]
            if broken:
                dep, other = broken[0], self.running.services[broken[0].service]
                self.machine.transition(rt, Event.DEPENDENCY_FAILED, f"{dep.service} will never be {dep.condition} (it is {other.state.label})")
            elif all(met for _, met in results):
                self.machine.transition(rt, Event.START, rt.restarts.reason())

    def _condition(self, dep: Dependency) -> bool | None:
        """Whether `dep` is met (True), not yet (False), or never will be (None). A dependency that
        itself still waits for its own (pending) is not yet met: a chain (app after db, db after
        migrate) starts link by link, whatever the order the services are listed in (the spec
        refuses cycles); if a link fails, the ones after it fail in turn."""
        other = self.running.services[dep.service]
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
        never = (State.FAILED, State.STOPPED)
        return None if other.state in never or (dep.condition != "completed" and other.state is State.EXITED) else False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """While a verb stops services to start them again (restart, a reload's changed services),
        the stack is not done, even if for a moment every service is stopped."""
        self.holds += 1
        try:
            yield
        finally:
            self.holds -= 1
            self.check_done()

    def check_done(self) -> None:
        """A foreground stack ends once every service is in a final state (none pending) and no verb
        holds it (held()); a detached stack runs until `sandboxd down`, even with every service stopped."""
        if self.detached or self.holds:
            return
        if all(rt.state in FINAL for rt in self.running.services.values()):
            self.done.set()
