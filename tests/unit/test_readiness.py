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


async def _ready_after_early_message(tmp_path: Path) -> tuple[list[State], str]:
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
    loop = asyncio.get_running_loop()
    loop.add_reader(rt.notify.socket.sock, readiness.on_notify, rt)
    states: list[State] = []
    try:
        machine.transition(rt, Event.START, "start")
        assert rt.state is State.STARTING
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"READY=1", str(tmp_path / "notify"))
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
        rt.notify.socket.close()
        for timer in (rt.timers.start, rt.timers.watchdog):
            if timer is not None:
                timer.cancel()
    return states, err.getvalue()


def test_a_ready_message_read_while_the_launch_is_not_known_to_have_run_counts_once_it_runs(tmp_path: Path) -> None:
    states, log = asyncio.run(_ready_after_early_message(tmp_path))
    assert states == [State.STARTING, State.READY], log
    assert "READY=1" in log
