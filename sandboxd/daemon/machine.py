"""The one place a service's state changes: a row of states.LIFE, logged once with its reason,
then the row's action, done by the collaborator the supervisor bound to it."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sandboxd.daemon.console import Console
from sandboxd.daemon.runtime import ServiceRuntime
from sandboxd.daemon.states import LIFE, Action, Event, State

# Until the summary is printed, a start and its first `running` are not logged: the summary says them.
QUIET_UNTIL_SUMMARY = {(State.STOPPED, State.STARTING), (State.PENDING, State.STARTING), (State.STARTING, State.RUNNING)}


class ServiceMachine:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.quiet_starts = True
        self.actions: dict[Action, Callable[[ServiceRuntime], None]] = {}
        self.entered: Callable[[State], None] = lambda state: None
        # Told of a service that failed for good before it was ever ready (the foreground says so at once).
        self.failed_before_ready: Callable[[ServiceRuntime], None] = lambda rt: None

    def bind(self, actions: Mapping[Action, Callable[[ServiceRuntime], None]], entered: Callable[[State], None]) -> None:
        """Who does each action of the table, and who is told of every state a service enters."""
        missing = LIFE.actions() - actions.keys()
        if missing:
            raise ValueError(f"no handler for the actions {sorted(a.value for a in missing)}")
        self.actions = dict(actions)
        self.entered = entered

    def allows(self, rt: ServiceRuntime, event: Event) -> bool:
        return LIFE.allows(rt.state, event)

    def transition(self, rt: ServiceRuntime, event: Event, reason: str) -> None:
        """Take the row for the service's state and `event` (TransitionRefused if there is none)."""
        step = LIFE.step(rt.state, event)
        old, rt.state, rt.reason = rt.state, step.next, reason
        if step.next is State.READY or (step.next is State.RUNNING and rt.spec.ready == "started"):
            rt.was_ready = True
        if not (self.quiet_starts and (old, step.next) in QUIET_UNTIL_SUMMARY):
            self.console.note(describe(rt.name, old, step.next, reason))
        if step.next is not old:
            self.entered(step.next)
        if step.action is not None:
            self.actions[step.action](rt)
        if step.next is State.FAILED and old is not State.FAILED and not rt.was_ready:
            self.failed_before_ready(rt)


def describe(name: str, old: State, new: State, reason: str) -> str:
    """The log line of a transition; where what is shown does not change (a kill for a failure,
    waiting for dependencies), the reason alone."""
    if old.label == new.label:
        return f"{name}: {reason}"
    return f"{name}: {old.label} -> {new.label}: {reason}"
