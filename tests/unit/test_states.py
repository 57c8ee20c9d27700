"""The state tables of a service's and a per-connection instance's life, and the machine that enforces them."""

from __future__ import annotations

import types

import io
from collections import deque
from enum import Enum
from typing import Any, cast

import pytest

from sandboxd.daemon.console import Console
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.runtime import Instance, ServiceRuntime
from sandboxd.daemon.states import (
    ALIVE,
    INSTANCE_LIFE,
    LIFE,
    Action,
    Event,
    InstanceEvent,
    InstanceState,
    State,
    Table,
    TransitionRefused,
)

# The life of a service, written out by hand: state, event, next state, action ("-" for none).
SERVICE_ROWS = """
stopped        start              starting       launch
pending        start              starting       launch
exited         start              starting       launch
failed         start              starting       launch
stopped        wait               waiting        watch
exited         wait               waiting        watch
failed         wait               waiting        watch
stopped        defer              pending        -
pending        dependency failed  failed         settle
waiting        connection         starting       launch
waiting        trigger limit      failed         settle
waiting        stop               stopped        -
starting       setup failed       failed         settle
starting       launched           running        arm
running        ready              ready          end start timeout
reloading      ready              ready          end start timeout
ready          reload             reloading      -
running        start timeout      running        kill
running        watchdog           running        kill
ready          watchdog           ready          kill
reloading      watchdog           reloading      kill
ready          unhealthy          ready          kill
running        idle               idle-stopping  stop
ready          idle               idle-stopping  stop
starting       stop               stopping       stop
running        stop               stopping       stop
ready          stop               stopping       stop
reloading      stop               stopping       stop
backoff        stop               stopped        cancel restart
backoff        delay elapsed      starting       launch
starting       exit: restart      backoff        restart later
running        exit: restart      backoff        restart later
ready          exit: restart      backoff        restart later
reloading      exit: restart      backoff        restart later
starting       exit: rearm        waiting        watch
running        exit: rearm        waiting        watch
ready          exit: rearm        waiting        watch
reloading      exit: rearm        waiting        watch
idle-stopping  exit: rearm        waiting        watch
starting       exit: success      exited         -
running        exit: success      exited         -
ready          exit: success      exited         -
reloading      exit: success      exited         -
starting       exit: failure      failed         -
running        exit: failure      failed         -
ready          exit: failure      failed         -
reloading      exit: failure      failed         -
stopping       exit: stopped      stopped        -
idle-stopping  exit: stopped      stopped        -
starting       fork server died   failed         -
running        fork server died   failed         -
ready          fork server died   failed         -
reloading      fork server died   failed         -
stopping       fork server died   stopped        -
idle-stopping  fork server died   stopped        -
"""

INSTANCE_ROWS = """
starting         launched      running
starting         setup failed  failed to start
starting         stop          stopping
running          stop          stopping
failed to start  stop          stopping
stopping         launched      stopping
stopping         setup failed  stopping
starting         exit          ended
running          exit          ended
failed to start  exit          ended
stopping         exit          ended
"""

COLUMNS = "  "  # columns are separated by two spaces or more; a cell may hold one


def rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split(COLUMNS) if cell.strip()] for line in text.strip().splitlines()]


def service_rows() -> list[tuple[State, Event, State, Action | None]]:
    return [(State(s), Event(e), State(n), None if a == "-" else Action(a)) for s, e, n, a in rows(SERVICE_ROWS)]


def instance_rows() -> list[tuple[InstanceState, InstanceEvent, InstanceState]]:
    return [(InstanceState(s), InstanceEvent(e), InstanceState(n)) for s, e, n in rows(INSTANCE_ROWS)]


class FakeRuntime:
    """What the machine touches of a service's runtime record: its state, its name, the reason
    of its state, whether it was ever ready, and its spec's `ready`."""

    def __init__(self, state: State, name: str = "svc") -> None:
        self.state = state
        self.name = name
        self.reason = ""
        self.was_ready = False
        self.spec = types.SimpleNamespace(ready="notify")


class Recorder:
    def __init__(self) -> None:
        self.done: list[tuple[Action, object]] = []
        self.entered: list[State] = []

    def actions(self) -> dict[Action, Any]:
        return {action: (lambda rt, action=action: self.done.append((action, rt))) for action in Action}


def machine(quiet_starts: bool = False) -> tuple[ServiceMachine, Recorder, io.StringIO]:
    err = io.StringIO()
    recorder = Recorder()
    m = ServiceMachine(Console(["svc"], out=io.StringIO(), err=err))
    m.quiet_starts = quiet_starts
    m.bind(recorder.actions(), entered=recorder.entered.append)
    return m, recorder, err


def transition(m: ServiceMachine, rt: FakeRuntime, event: Event, reason: str) -> None:
    m.transition(cast(ServiceRuntime, rt), event, reason)


def test_the_service_table_is_the_life_written_out() -> None:
    expected = {(s, e): (n, a) for s, e, n, a in service_rows()}
    assert len(expected) == len(service_rows())
    assert {pair: (step.next, step.action) for pair, step in LIFE.steps.items()} == expected


@pytest.mark.parametrize(("state", "event", "next_state", "action"), service_rows(), ids=lambda v: getattr(v, "value", None))
def test_every_allowed_transition_reaches_its_state_logs_once_and_runs_its_action(state: State, event: Event, next_state: State, action: Action | None) -> None:
    m, recorder, err = machine()
    rt = FakeRuntime(state)
    transition(m, rt, event, "because")
    assert rt.state is next_state
    assert recorder.done == ([(action, rt)] if action is not None else [])
    assert recorder.entered == ([next_state] if next_state is not state else [])
    lines = err.getvalue().splitlines()
    if state.label == next_state.label:
        assert lines == ["sandboxd: svc: because"]
    else:
        assert lines == [f"sandboxd: svc: {state.label} -> {next_state.label}: because"]


REFUSED = [(s, e) for s in State for e in Event if (s, e) not in LIFE.steps]


@pytest.mark.parametrize(("state", "event"), REFUSED, ids=lambda v: v.value)
def test_a_transition_the_table_does_not_have_is_refused_and_changes_nothing(state: State, event: Event) -> None:
    m, recorder, err = machine()
    rt = FakeRuntime(state)
    assert not m.allows(cast(ServiceRuntime, rt), event)
    with pytest.raises(TransitionRefused, match=f"{event.value!r} in state {state.value!r}"):
        transition(m, rt, event, "because")
    assert rt.state is state
    assert recorder.done == [] and recorder.entered == [] and err.getvalue() == ""


def test_refused_pairs_include_the_ones_that_matter() -> None:
    for pair in [
        (State.STOPPED, Event.READY),
        (State.EXITED, Event.STOP),
        (State.STOPPING, Event.STOP),
        (State.BACKOFF, Event.EXIT_RESTART),
        (State.WAITING, Event.LAUNCHED),
        (State.PENDING, Event.WAIT),
        (State.READY, Event.START_TIMEOUT),
        (State.RELOADING, Event.IDLE),
        (State.STOPPING, Event.EXIT_REARM),
        (State.FAILED, Event.EXIT_FAILURE),
    ]:
        assert pair in REFUSED


def reachable(table: Table[Any, Any], start: Enum) -> set[Enum]:
    seen, todo = {start}, deque([start])
    while todo:
        state = todo.popleft()
        for (s, _event), step in table.steps.items():
            if s is state and step.next not in seen:
                seen.add(step.next)
                todo.append(step.next)
    return seen


def test_every_service_state_is_reachable_from_stopped() -> None:
    assert LIFE.start is State.STOPPED
    assert reachable(LIFE, State.STOPPED) == set(State)


@pytest.mark.parametrize("state", [s for s in State if s not in LIFE.final], ids=lambda s: s.value)
def test_every_non_final_service_state_can_reach_a_final_one(state: State) -> None:
    assert reachable(LIFE, state) & LIFE.final


def test_final_service_states_wait_for_someone_to_start_them() -> None:
    assert LIFE.final == {State.STOPPED, State.EXITED, State.FAILED}
    for state in LIFE.final:
        assert {event for (s, event) in LIFE.steps if s is state} <= {Event.START, Event.WAIT, Event.DEFER}


def test_hidden_states_are_shown_as_before() -> None:
    assert State.PENDING.label == "stopped"
    assert State.IDLE_STOPPING.label == "stopping"
    assert all(s.label == s.value for s in State if s not in (State.PENDING, State.IDLE_STOPPING))


def test_a_kill_for_a_failure_is_logged_as_its_reason_alone() -> None:
    m, recorder, err = machine()
    rt = FakeRuntime(State.READY)
    transition(m, rt, Event.WATCHDOG, "watchdog timeout: no WATCHDOG=1 within 0.3 s; sending SIGABRT")
    assert err.getvalue() == "sandboxd: svc: watchdog timeout: no WATCHDOG=1 within 0.3 s; sending SIGABRT\n"
    assert recorder.done == [(Action.KILL, rt)] and rt.state is State.READY


def test_starts_are_quiet_until_the_summary_and_logged_after_it() -> None:
    m, _recorder, err = machine(quiet_starts=True)
    rt, pending = FakeRuntime(State.STOPPED), FakeRuntime(State.PENDING, "app")
    transition(m, rt, Event.START, "start")
    transition(m, rt, Event.LAUNCHED, "pid 7")
    transition(m, pending, Event.START, "start")
    transition(m, rt, Event.READY, "READY=1")
    assert err.getvalue() == "sandboxd: svc: running -> ready: READY=1\n"
    m.quiet_starts = False
    transition(m, rt, Event.STOP, "sending SIGTERM")
    transition(m, rt, Event.EXIT_STOPPED, "killed by SIGTERM")
    transition(m, rt, Event.START, "restart #1")
    assert err.getvalue().splitlines()[1:] == [
        "sandboxd: svc: ready -> stopping: sending SIGTERM",
        "sandboxd: svc: stopping -> stopped: killed by SIGTERM",
        "sandboxd: svc: stopped -> starting: restart #1",
    ]


def test_binding_refuses_a_table_action_without_a_handler() -> None:
    m = ServiceMachine(Console(["svc"], out=io.StringIO(), err=io.StringIO()))
    with pytest.raises(ValueError, match="kill"):
        m.bind({a: (lambda rt: None) for a in Action if a is not Action.KILL}, entered=lambda state: None)


def test_the_drawn_table_has_a_line_for_every_row() -> None:
    for table in (LIFE, INSTANCE_LIFE):
        drawn = table.render().splitlines()
        assert len(drawn) == 2 + len(table.rows)
        for states, event, next_state, _action in table.rows:
            assert any(event.value in line and next_state.value in line and states[0].value in line for line in drawn)


def test_a_table_with_two_rows_for_one_pair_is_refused() -> None:
    with pytest.raises(ValueError, match="two rows"):
        Table(State.STOPPED, (), [((State.STOPPED,), Event.START, State.STARTING, None), ((State.STOPPED,), Event.START, State.WAITING, None)])


# ── per-connection instances ──


def test_the_instance_table_is_the_life_written_out() -> None:
    expected = {(s, e): n for s, e, n in instance_rows()}
    assert {pair: step.next for pair, step in INSTANCE_LIFE.steps.items()} == expected
    assert INSTANCE_LIFE.actions() == set()


def instance(state: InstanceState) -> Instance:
    return Instance(cast(ServiceRuntime, None), "svc@1", cast(Any, None), state=state)


@pytest.mark.parametrize(("state", "event", "next_state"), instance_rows(), ids=lambda v: v.value)
def test_every_allowed_instance_transition_reaches_its_state(state: InstanceState, event: InstanceEvent, next_state: InstanceState) -> None:
    one = instance(state)
    assert one.allows(event)
    one.transition(event)
    assert one.state is next_state


INSTANCE_REFUSED = [(s, e) for s in InstanceState for e in InstanceEvent if (s, e) not in INSTANCE_LIFE.steps]


@pytest.mark.parametrize(("state", "event"), INSTANCE_REFUSED, ids=lambda v: v.value)
def test_an_instance_transition_the_table_does_not_have_is_refused(state: InstanceState, event: InstanceEvent) -> None:
    one = instance(state)
    assert not one.allows(event)
    with pytest.raises(TransitionRefused):
        one.transition(event)
    assert one.state is state


def test_an_ended_instance_does_nothing_more() -> None:
    assert INSTANCE_LIFE.final == {InstanceState.ENDED}
    assert [e for (s, e) in INSTANCE_LIFE.steps if s is InstanceState.ENDED] == []


def test_every_instance_state_is_reachable_and_can_end() -> None:
    assert reachable(INSTANCE_LIFE, InstanceState.STARTING) == set(InstanceState)
    for state in InstanceState:
        assert InstanceState.ENDED in reachable(INSTANCE_LIFE, state)


def test_the_reason_of_each_transition_is_kept_with_the_service() -> None:
    m, _recorder, _err = machine()
    rt = FakeRuntime(State.RUNNING)
    transition(m, rt, Event.EXIT_RESTART, "exited with code 3; restarting in 0.4 s")
    assert (rt.state, rt.reason) == (State.BACKOFF, "exited with code 3; restarting in 0.4 s")
    transition(m, rt, Event.DELAY_ELAPSED, "restart #1")
    assert rt.reason == "restart #1"


def test_a_service_failing_for_good_before_it_was_ever_ready_is_told_once() -> None:
    m, _recorder, _err = machine()
    told: list[object] = []
    m.failed_before_ready = told.append
    never = FakeRuntime(State.RUNNING)
    transition(m, never, Event.EXIT_FAILURE, "exited with code 3")
    assert told == [never]
    once = FakeRuntime(State.RUNNING)
    transition(m, once, Event.READY, "READY=1")
    assert once.was_ready
    transition(m, once, Event.EXIT_FAILURE, "exited with code 3")
    assert told == [never]  # it was ready once: not a failure to start
    started = FakeRuntime(State.STARTING)
    started.spec.ready = "started"
    transition(m, started, Event.LAUNCHED, "pid 7")
    assert started.was_ready  # with ready: started, running is ready


SANDBOX_MAY_EXIST = (*ALIVE, State.STOPPING, State.IDLE_STOPPING)


@pytest.mark.parametrize("state", SANDBOX_MAY_EXIST, ids=lambda s: s.value)
def test_the_fork_server_dying_takes_every_service_with_a_sandbox_to_a_final_state(state: State) -> None:
    m, _recorder, err = machine()
    rt = FakeRuntime(state)
    transition(m, rt, Event.FORK_SERVER_DIED, "the fork server died (killed by SIGKILL)")
    assert rt.state in LIFE.final
    assert rt.reason == "the fork server died (killed by SIGKILL)"
    assert "the fork server died" in err.getvalue()


@pytest.mark.parametrize("state", [s for s in State if s not in SANDBOX_MAY_EXIST], ids=lambda s: s.value)
def test_a_service_without_a_sandbox_is_not_touched_by_the_fork_server_dying(state: State) -> None:
    assert not LIFE.allows(state, Event.FORK_SERVER_DIED)


def test_a_service_failed_by_the_fork_server_dying_may_be_started_again() -> None:
    assert LIFE.step(State.FAILED, Event.START).next is State.STARTING
    assert LIFE.step(State.STOPPED, Event.WAIT).next is State.WAITING
