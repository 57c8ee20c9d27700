"""sd_notify messages and the launch's end: a READY=1 read before the loop has read that the
sandbox executed its command is not lost."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import textwrap
import types
from pathlib import Path
from typing import Any, cast

import pytest

from sandboxd.daemon.console import Console
from sandboxd.daemon.machine import ServiceMachine
from sandboxd.daemon.notify import NotifySocket
from sandboxd.daemon.readiness import FdStore, Readiness
from sandboxd.daemon.runtime import OutputPipe, RunningStack, ServiceRuntime
from sandboxd.daemon.states import Action, Event, State
from sandboxd.spec.load import load_stack

SPEC = """
kind: service
name: db
ready: notify
notify_access: all
command: [x]
"""


def _service(tmp_path: Path) -> tuple[ServiceRuntime, ServiceMachine, Readiness, io.StringIO]:
    """The service of SPEC with its notify socket, a state machine binding no action, its readiness."""
    (tmp_path / "stack.yaml").write_text(textwrap.dedent(SPEC))
    stack = load_stack(tmp_path)
    service = stack.services[0]
    # Every process of this test is "in its cgroup": notify_access all accepts this one's messages.
    cgroup = types.SimpleNamespace(pids=lambda: [os.getpid()])
    rt = ServiceRuntime(service, cast(Any, None), cast(Any, cgroup), OutputPipe(-1, -1))
    err = io.StringIO()
    console = Console([service.name], out=io.StringIO(), err=err)
    machine = ServiceMachine(console)
    machine.quiet_starts = False
    readiness = Readiness(machine, console, FdStore(console, RunningStack(stack, {}, {}, {}, "test", tmp_path / "run")))
    machine.bind({a: (lambda rt: None) for a in Action}, entered=lambda state: None)
    rt.notify.socket = NotifySocket(tmp_path / "notify")
    return rt, machine, readiness, err


def _say(tmp_path: Path, message: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(message, str(tmp_path / "notify"))


def _close(rt: ServiceRuntime) -> None:
    assert rt.notify.socket is not None
    rt.notify.socket.close()
    for timer in (rt.timers.start, rt.timers.watchdog):
        if timer is not None:
            timer.cancel()


async def _ready_after_early_message(tmp_path: Path) -> tuple[list[State], str]:
    rt, machine, readiness, err = _service(tmp_path)
    assert rt.notify.socket is not None
    loop = asyncio.get_running_loop()
    loop.add_reader(rt.notify.socket.sock, readiness.on_notify, rt)
    states: list[State] = []
    try:
        machine.transition(rt, Event.START, "start")
        assert rt.state is State.STARTING
        _say(tmp_path, b"READY=1")
        for _ in range(5):  # the loop wakes for the message before the launch's end is read
            await asyncio.sleep(0)
        states.append(rt.state)
        machine.transition(rt, Event.LAUNCHED, "pid 1")
        readiness.arm(rt)
        for _ in range(5):
            await asyncio.sleep(0)
        states.append(rt.state)
    finally:
        loop.remove_reader(rt.notify.socket.sock)
        _close(rt)
    return states, err.getvalue()


def test_a_ready_message_read_while_the_launch_is_not_known_to_have_run_counts_once_it_runs(tmp_path: Path) -> None:
    states, log = asyncio.run(_ready_after_early_message(tmp_path))
    assert states == [State.STARTING, State.READY], log
    assert "READY=1" in log


async def _ready_after(tmp_path: Path, message: bytes) -> tuple[State, int, str]:
    """A running service says `message`: its state after it, the ERRNO kept, the log."""
    rt, machine, readiness, err = _service(tmp_path)
    try:
        machine.transition(rt, Event.START, "start")
        machine.transition(rt, Event.LAUNCHED, "pid 1")
        readiness.arm(rt)  # its start_timeout runs: EXTEND_TIMEOUT_USEC= applies
        _say(tmp_path, message)
        readiness.on_notify(rt)
    finally:
        _close(rt)
    return rt.state, rt.notify.errno, err.getvalue()


@pytest.mark.parametrize("field", ["ERRNO=\u00b2", "MAINPID=\u00b2", "WATCHDOG_USEC=\u00b2", "EXTEND_TIMEOUT_USEC=\u00b2", "ERRNO=99999999999999999999"])
def test_a_number_field_that_is_no_number_is_ignored_and_the_rest_of_the_message_counts(tmp_path: Path, field: str) -> None:
    """Digits that are not ASCII pass str.isdigit and made int() raise in the loop's callback
    (the rest of the message lost: READY=1 never counted); an ERRNO beyond any errno made the
    exit's report raise (os.strerror)."""
    state, errno, log = asyncio.run(_ready_after(tmp_path, f"{field}\nREADY=1".encode()))
    assert (state, errno) == (State.READY, 0), log
