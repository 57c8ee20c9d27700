"""A service's life and a per-connection instance's life, each one table of state × event.

Every row says, for a state and an event, the next state and the action that follows (s6-supervise's
`actions[state][event]`). Nothing changes a state but a row: `ServiceMachine.transition`
(machine.py) and `Instance.transition` (runtime.py) look the pair up and raise `TransitionRefused`,
an internal error, for a pair the table does not have. Where a state once hid in a flag it is a
state here: a service waiting for its `after:` dependencies is `pending`, one stopped for
`idle_stop` is `idle-stopping`; both are shown as `stopped` and `stopping` (their `label`), as before.

Which exit event a service gets is decided by restart.py's rules (lifecycle.py): restart it
(`exit: restart`), wait for the next connection (`exit: rearm`), or end (`exit: success`,
`exit: failure`); an exit after a stop is `exit: stopped`. The death of the fork server ends every
sandbox at once (`fork server died`): a running service is then `failed`, one being stopped is
`stopped`, each with that reason; recovery.py starts a new fork server and starts them again. The tables, drawn from the rows below:
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar


class State(Enum):
    """A service's state. `label` is what `sandboxd ps` and the log lines show."""

    STOPPED = "stopped"
    PENDING = "pending"  # waits for its after: dependencies; shown as stopped
    WAITING = "waiting"  # for a connection: on-demand, or one sandbox per connection
    STARTING = "starting"
    RUNNING = "running"
    READY = "ready"
    RELOADING = "reloading"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    IDLE_STOPPING = "idle-stopping"  # stopped for idle_stop, waits for a connection once it exited; shown as stopping
    EXITED = "exited"
    FAILED = "failed"

    @property
    def label(self) -> str:
        return _LABELS.get(self, self.value)


_LABELS = {State.PENDING: "stopped", State.IDLE_STOPPING: "stopping"}


class Event(Enum):
    START = "start"  # eager start, a start by hand, or its dependencies are met
    WAIT = "wait"  # on-demand or accept: true, at start or by hand
    DEFER = "defer"  # it has after: dependencies, not met yet
    DEPENDENCY_FAILED = "dependency failed"  # one will never be met
    CONNECTION = "connection"  # the first connection to an on-demand service's socket
    TRIGGER_LIMIT = "trigger limit"  # ... while its start_limit is used up
    SETUP_FAILED = "setup failed"  # its cgroup could not be renewed: no sandbox was asked for
    LAUNCHED = "launched"  # the child is about to exec (its status channel closed cleanly)
    READY = "ready"  # READY=1, or the health check passed
    RELOAD = "reload"  # RELOADING=1
    START_TIMEOUT = "start timeout"  # not ready within start_timeout
    WATCHDOG = "watchdog"  # no WATCHDOG=1 within the watchdog interval (or WATCHDOG=trigger)
    UNHEALTHY = "unhealthy"  # the health check failed `retries` times in a row
    IDLE = "idle"  # idle for idle_stop
    STOP = "stop"  # asked to stop (by hand, a reload, or the stack going down)
    DELAY_ELAPSED = "delay elapsed"  # the restart delay is over
    EXIT_RESTART = "exit: restart"
    EXIT_REARM = "exit: rearm"
    EXIT_SUCCESS = "exit: success"
    EXIT_FAILURE = "exit: failure"
    EXIT_STOPPED = "exit: stopped"
    # The fork server died (SIGKILL: the OOM killer, an operator), and every sandbox with it, as
    # its pid namespace went: sandboxd's fault, not the service's; recovery.py then restarts the
    # services per their `restart:` with a new fork server, or stops the stack.
    FORK_SERVER_DIED = "fork server died"


class Action(Enum):
    """What follows a transition; the supervisor binds each to the collaborator that does it."""

    LAUNCH = "launch"  # ask the fork server for a sandbox
    WATCH = "watch"  # watch its sockets for a connection
    ARM = "arm"  # start_timeout, watchdog, health check and idle_stop timers; its proxies
    END_START_TIMEOUT = "end start timeout"
    KILL = "kill"  # the verdict's signal to its init; SIGKILL to its cgroup after stop_timeout
    STOP = "stop"  # stop_signal to its init; SIGKILL to its cgroup after stop_timeout
    RESTART_LATER = "restart later"  # after restart_delay (restart.py)
    CANCEL_RESTART = "cancel restart"
    SETTLE = "settle"  # it will not start: the stack may be done


class InstanceState(Enum):
    """A per-connection instance's state: one sandbox serving one accepted connection."""

    STARTING = "starting"
    RUNNING = "running"
    FAILED_TO_START = "failed to start"  # its set-up failed; its end is still to come
    STOPPING = "stopping"
    ENDED = "ended"


class InstanceEvent(Enum):
    LAUNCHED = "launched"
    SETUP_FAILED = "setup failed"
    STOP = "stop"  # the stack goes down
    EXIT = "exit"


S = TypeVar("S", bound=Enum)
E = TypeVar("E", bound=Enum)


class TransitionRefused(RuntimeError):
    """A transition the table does not have: a bug in sandboxd, never the user's doing."""


@dataclass(frozen=True)
class Step(Generic[S]):
    next: S
    action: Action | None


class Table(Generic[S, E]):
    """Rows of (states, event, next state, action); a row may stand for several states at once."""

    def __init__(self, start: S, final: Iterable[S], rows: Iterable[tuple[Iterable[S], E, S, Action | None]]) -> None:
        self.start = start
        self.final = frozenset(final)
        self.steps: dict[tuple[S, E], Step[S]] = {}
        self.rows = [(tuple(states), event, next_state, action) for states, event, next_state, action in rows]
        for states, event, next_state, action in self.rows:
            for state in states:
                if (state, event) in self.steps:
                    raise ValueError(f"two rows for {state.value} × {event.value}")
                self.steps[(state, event)] = Step(next_state, action)

    def step(self, state: S, event: E) -> Step[S]:
        try:
            return self.steps[(state, event)]
        except KeyError:
            raise TransitionRefused(f"{event.value!r} in state {state.value!r}: the state table has no such transition") from None

    def allows(self, state: S, event: E) -> bool:
        return (state, event) in self.steps

    def actions(self) -> set[Action]:
        return {step.action for step in self.steps.values() if step.action is not None}

    def render(self) -> str:
        """The table drawn as text, a line for each row, in the order of the rows."""
        lines = [("state", "event", "next", "action")]
        lines += [(", ".join(s.value for s in states), e.value, n.value, a.value if a else "-") for states, e, n, a in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(4)]
        drawn = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
        drawn.insert(1, "  ".join("─" * width for width in widths))
        return "\n".join("    " + line.rstrip() for line in drawn)


ALIVE = (State.STARTING, State.RUNNING, State.READY, State.RELOADING)  # a sandbox of it exists
FINAL = (State.STOPPED, State.EXITED, State.FAILED)  # nothing happens until someone starts it

_S = State
LIFE: Table[State, Event] = Table(
    start=State.STOPPED,
    final=FINAL,
    rows=[
        ((_S.STOPPED, _S.PENDING, _S.EXITED, _S.FAILED), Event.START, _S.STARTING, Action.LAUNCH),
        ((_S.STOPPED, _S.EXITED, _S.FAILED), Event.WAIT, _S.WAITING, Action.WATCH),
        ((_S.STOPPED,), Event.DEFER, _S.PENDING, None),
        ((_S.PENDING,), Event.DEPENDENCY_FAILED, _S.FAILED, Action.SETTLE),
        ((_S.WAITING,), Event.CONNECTION, _S.STARTING, Action.LAUNCH),
        ((_S.WAITING,), Event.TRIGGER_LIMIT, _S.FAILED, Action.SETTLE),
        ((_S.WAITING,), Event.STOP, _S.STOPPED, None),
        ((_S.STARTING,), Event.SETUP_FAILED, _S.FAILED, Action.SETTLE),
        ((_S.STARTING,), Event.LAUNCHED, _S.RUNNING, Action.ARM),
        ((_S.RUNNING, _S.RELOADING), Event.READY, _S.READY, Action.END_START_TIMEOUT),
        ((_S.READY,), Event.RELOAD, _S.RELOADING, None),
        ((_S.RUNNING,), Event.START_TIMEOUT, _S.RUNNING, Action.KILL),
        ((_S.RUNNING,), Event.WATCHDOG, _S.RUNNING, Action.KILL),
        ((_S.READY,), Event.WATCHDOG, _S.READY, Action.KILL),
        ((_S.RELOADING,), Event.WATCHDOG, _S.RELOADING, Action.KILL),
        ((_S.READY,), Event.UNHEALTHY, _S.READY, Action.KILL),
        ((_S.RUNNING, _S.READY), Event.IDLE, _S.IDLE_STOPPING, Action.STOP),
        (ALIVE, Event.STOP, _S.STOPPING, Action.STOP),
        ((_S.BACKOFF,), Event.STOP, _S.STOPPED, Action.CANCEL_RESTART),
        ((_S.BACKOFF,), Event.DELAY_ELAPSED, _S.STARTING, Action.LAUNCH),
        (ALIVE, Event.EXIT_RESTART, _S.BACKOFF, Action.RESTART_LATER),
        ((*ALIVE, _S.IDLE_STOPPING), Event.EXIT_REARM, _S.WAITING, Action.WATCH),
        (ALIVE, Event.EXIT_SUCCESS, _S.EXITED, None),
        (ALIVE, Event.EXIT_FAILURE, _S.FAILED, None),
        ((_S.STOPPING, _S.IDLE_STOPPING), Event.EXIT_STOPPED, _S.STOPPED, None),
        (ALIVE, Event.FORK_SERVER_DIED, _S.FAILED, None),
        ((_S.STOPPING, _S.IDLE_STOPPING), Event.FORK_SERVER_DIED, _S.STOPPED, None),
    ],
)

_I = InstanceState
INSTANCE_LIFE: Table[InstanceState, InstanceEvent] = Table(
    start=_I.STARTING,
    final=(_I.ENDED,),
    rows=[
        ((_I.STARTING,), InstanceEvent.LAUNCHED, _I.RUNNING, None),
        ((_I.STARTING,), InstanceEvent.SETUP_FAILED, _I.FAILED_TO_START, None),
        ((_I.STARTING, _I.RUNNING, _I.FAILED_TO_START), InstanceEvent.STOP, _I.STOPPING, None),
        ((_I.STOPPING,), InstanceEvent.LAUNCHED, _I.STOPPING, None),
        ((_I.STOPPING,), InstanceEvent.SETUP_FAILED, _I.STOPPING, None),
        ((_I.STARTING, _I.RUNNING, _I.FAILED_TO_START, _I.STOPPING), InstanceEvent.EXIT, _I.ENDED, None),
    ],
)
__doc__ = f"{__doc__}\nA service:\n\n{LIFE.render()}\n\nA per-connection instance:\n\n{INSTANCE_LIFE.render()}\n"
