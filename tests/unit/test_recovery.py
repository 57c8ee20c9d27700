"""When the fork server keeps dying, or no new one can start: the stack is stopped, not recovered."""

from __future__ import annotations

import time
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any, cast

import pytest

from sandboxd.daemon import recovery
from sandboxd.daemon.recovery import DEATHS_BURST, DEATHS_INTERVAL, ForkServerRecovery


class Tasks:
    def __init__(self) -> None:
        self.spawned: list[str] = []

    def spawn(self, coroutine: Coroutine[Any, Any, None], what: str) -> None:
        coroutine.close()  # the reaping is not what these tests look at
        self.spawned.append(what)


class Console:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


def _recovery(stops: list[str]) -> tuple[ForkServerRecovery, SimpleNamespace, Console]:
    running, console = SimpleNamespace(stopping=False), Console()
    made = ForkServerRecovery(cast(Any, running), cast(Any, SimpleNamespace()), cast(Any, Tasks()), cast(Any, console), lambda: [], lambda: stops.append("stop"))
    return made, running, console


def test_the_fifth_death_within_the_interval_stops_the_stack_instead_of_starting_another(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[bool] = []
    monkeypatch.setattr(recovery.ForkServer, "start", staticmethod(lambda replacing=False: started.append(replacing)))
    stops: list[str] = []
    made, running, console = _recovery(stops)
    made.deaths = [time.monotonic() - DEATHS_INTERVAL - 1] + [time.monotonic()] * (DEATHS_BURST - 1)  # one of them too old to count
    made.on_death(cast(Any, SimpleNamespace(pid=4242)))
    assert made.gave_up == f"it died {DEATHS_BURST} times within {DEATHS_INTERVAL:g} s"
    assert stops == ["stop"] and running.stopping is True and started == []
    assert console.notes[-1] == f"the fork server is not replaced ({made.gave_up}); stopping the stack"


def test_a_fork_server_that_cannot_start_stops_the_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(replacing: bool = False) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(recovery.ForkServer, "start", staticmethod(fails))
    stops: list[str] = []
    made, running, _console = _recovery(stops)
    made.on_death(cast(Any, SimpleNamespace(pid=4242)))
    assert made.gave_up.startswith("a new one could not start: ") and "Resource temporarily unavailable" in made.gave_up
    assert stops == ["stop"] and running.stopping is True


def test_a_death_while_the_stack_stops_starts_no_new_fork_server(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[bool] = []
    monkeypatch.setattr(recovery.ForkServer, "start", staticmethod(lambda replacing=False: started.append(replacing)))
    stops: list[str] = []
    made, running, _console = _recovery(stops)
    running.stopping = True
    made.on_death(cast(Any, SimpleNamespace(pid=4242)))
    assert started == [] and stops == [] and made.gave_up == ""
