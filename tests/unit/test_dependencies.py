"""after: dependencies: a pending service starts once they are met, fails once one never will be;
a foreground stack is done once every service is in a final state."""

from __future__ import annotations

import asyncio
import io
import textwrap
from pathlib import Path
from typing import Any, cast

from sandboxd.daemon.console import Console
from sandboxd.daemon.dependencies import Dependencies
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.runtime import OutputPipe, RunningStack, ServiceRuntime
from sandboxd.daemon.states import Action, State
from sandboxd.spec.load import load_stack
from sandboxd.spec.model import Stack

SPEC = """
kind: service
name: migrate
restart: "no"
command: [x]
---
kind: service
name: db
ready: notify
command: [x]
---
kind: service
name: app
after: [{service: migrate, condition: completed}, {service: db, condition: ready}]
command: [x]
"""


def stack_of(tmp_path: Path) -> Stack:
    (tmp_path / "stack.yaml").write_text(textwrap.dedent(SPEC))
    return load_stack(tmp_path)


def setup(tmp_path: Path, detached: bool = False) -> tuple[Dependencies, dict[str, ServiceRuntime], list[tuple[Action, str]], io.StringIO]:
    stack = stack_of(tmp_path)
    running = RunningStack(stack, {}, {}, {}, "test", tmp_path / "run")
    for service in stack.services:
        running.services[service.name] = ServiceRuntime(service, cast(Any, None), cast(Any, None), OutputPipe(-1, -1))
    err = io.StringIO()
    machine = ServiceMachine(Console([s.name for s in stack.services], out=io.StringIO(), err=err))
    machine.quiet_starts = False
    done: list[tuple[Action, str]] = []
    machine.bind({a: (lambda rt, a=a: done.append((a, rt.name))) for a in Action}, entered=lambda state: None)
    return Dependencies(machine, running, asyncio.Event(), detached), running.services, done, err


def test_a_pending_service_starts_once_every_condition_is_met(tmp_path: Path) -> None:
    deps, services, done, err = setup(tmp_path)
    services["app"].state = State.PENDING
    services["migrate"].state, services["db"].state = State.RUNNING, State.RUNNING
    deps.release()
    assert services["app"].state is State.PENDING and done == []
    services["migrate"].state = State.EXITED
    deps.release()
    assert services["app"].state is State.PENDING  # db runs, but is not ready yet
    services["db"].state = State.READY
    deps.release()
    assert services["app"].state is State.STARTING
    assert done == [(Action.LAUNCH, "app")]
    assert err.getvalue() == "sandboxd: app: stopped -> starting: start\n"


def test_a_pending_service_fails_once_a_condition_never_will_be_met(tmp_path: Path) -> None:
    deps, services, done, err = setup(tmp_path)
    services["app"].state = State.PENDING
    services["migrate"].state, services["db"].state = State.FAILED, State.READY
    deps.release()
    assert services["app"].state is State.FAILED
    assert done == [(Action.SETTLE, "app")]
    assert err.getvalue() == "sandboxd: app: stopped -> failed: migrate will never be completed (it is failed)\n"


def test_nothing_is_released_while_the_stack_stops(tmp_path: Path) -> None:
    deps, services, done, _err = setup(tmp_path)
    services["app"].state = State.PENDING
    services["migrate"].state, services["db"].state = State.EXITED, State.READY
    deps.running.stopping = True
    deps.release()
    assert services["app"].state is State.PENDING and done == []


def test_a_foreground_stack_is_done_once_every_service_is_final_and_none_pending(tmp_path: Path) -> None:
    deps, services, _done, _err = setup(tmp_path)
    services["migrate"].state, services["db"].state, services["app"].state = State.EXITED, State.FAILED, State.PENDING
    deps.check_done()
    assert not deps.done.is_set()
    services["app"].state = State.STOPPED
    deps.check_done()
    assert deps.done.is_set()


def test_a_detached_stack_is_never_done_by_itself(tmp_path: Path) -> None:
    deps, services, _done, _err = setup(tmp_path, detached=True)
    for rt in services.values():
        rt.state = State.STOPPED
    deps.check_done()
    assert not deps.done.is_set()


def test_a_foreground_stack_is_not_done_while_a_verb_restarts_its_services(tmp_path: Path) -> None:
    """`sandboxd restart` of a one-service stack stops it before starting it: every service is
    stopped for a moment, and the stack must not end then (it did, now and then, in CI)."""
    deps, services, _done, _err = setup(tmp_path)
    with deps.held():
        for rt in services.values():
            rt.state = State.STOPPED
        deps.check_done()  # what the stopped service's exit calls
        assert not deps.done.is_set()
        services["app"].state = State.STARTING  # the verb's start
    assert not deps.done.is_set()
    services["app"].state = State.STOPPED
    deps.check_done()
    assert deps.done.is_set()


def test_a_held_stack_whose_services_were_not_started_again_is_done_when_the_verb_ends(tmp_path: Path) -> None:
    deps, services, _done, _err = setup(tmp_path)
    with deps.held():
        for rt in services.values():
            rt.state = State.STOPPED
        deps.check_done()
    assert deps.done.is_set()


def test_a_dependency_that_is_itself_pending_is_not_yet_met(tmp_path: Path) -> None:
    """app after db, db itself pending (here with nothing left to wait for): app waits (it used to
    fail at once, "db will never be ready (it is stopped)"), db starts; once db is ready, app starts."""
    deps, services, done, err = setup(tmp_path)
    services["app"].state, services["db"].state, services["migrate"].state = State.PENDING, State.PENDING, State.EXITED
    deps.release()
    assert (services["app"].state, services["db"].state, done) == (State.PENDING, State.STARTING, [(Action.LAUNCH, "db")])
    assert "will never be" not in err.getvalue()
    services["db"].state = State.READY
    deps.release()
    assert (services["app"].state, done[1:]) == (State.STARTING, [(Action.LAUNCH, "app")])


def test_a_chain_fails_link_by_link_once_a_dependency_fails(tmp_path: Path) -> None:
    deps, services, _done, err = setup(tmp_path)
    services["app"].state, services["db"].state, services["migrate"].state = State.PENDING, State.FAILED, State.EXITED
    deps.release()
    assert services["app"].state is State.FAILED
    assert "db will never be ready (it is failed)" in err.getvalue()
