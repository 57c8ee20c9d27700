"""What a failed or backoff service answers in the status (operations.py, wire.py) and how its
failure is said with the last lines of its log (daemon/failures.py)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, cast

from sandboxd.daemon.failures import failure_report
from sandboxd.daemon.logs import LogFiles
from sandboxd.daemon.operations import Operations
from sandboxd.daemon.runtime import ExitStatus, Launch
from sandboxd.daemon.states import State
from sandboxd.wire import StackStatus, conforms


def _status(state: State, reason: str, exit: ExitStatus | None) -> dict[str, Any]:
    """The status answer of one service in `state`, from a runtime record of fakes."""
    launch = Launch(exit=exit)
    rt = types.SimpleNamespace(
        spec=types.SimpleNamespace(name="web", ready="started"),
        plan=types.SimpleNamespace(fd_sockets=[], proxied=[]),
        cgroup=types.SimpleNamespace(stats=lambda: {"cpu_usec": 0, "processes": 0}),
        state=state,
        reason=reason,
        launch=launch,
        restarts=types.SimpleNamespace(count=1),
        notify=types.SimpleNamespace(status_text=""),
        connections=types.SimpleNamespace(active=0),
    )
    running = types.SimpleNamespace(instance="st", stack=types.SimpleNamespace(folder="/srv/st"), services={"web": rt})
    operations = Operations(cast(Any, running), cast(Any, types.SimpleNamespace(record=None)), *(cast(Any, None),) * 6)
    status = operations.status([])
    assert conforms(status, StackStatus) == ""
    return dict(status["services"][0])


def test_a_backoff_service_answers_its_reason_and_exit_code() -> None:
    web = _status(State.BACKOFF, "exited with code 3; restarting in 0.4 s", ExitStatus(3, None))
    assert (web["reason"], web["exit_code"]) == ("exited with code 3; restarting in 0.4 s", 3)
    assert "signal" not in web


def test_a_failed_service_killed_by_a_signal_answers_the_signal() -> None:
    web = _status(State.FAILED, "oom-killed; killed by SIGKILL", ExitStatus(None, "SIGKILL"))
    assert (web["reason"], web["signal"]) == ("oom-killed; killed by SIGKILL", "SIGKILL")
    assert "exit_code" not in web


def test_a_service_that_could_not_start_answers_its_reason_alone() -> None:
    web = _status(State.FAILED, "could not start: mount: /srv: No such file or directory", None)
    assert web["reason"] == "could not start: mount: /srv: No such file or directory"
    assert "exit_code" not in web and "signal" not in web


def test_a_service_neither_failed_nor_in_backoff_answers_no_reason() -> None:
    web = _status(State.RUNNING, "restart #1", ExitStatus(3, None))  # the last exit is history now
    assert web["reason"] == ""
    assert "exit_code" not in web and "signal" not in web


def test_a_failure_is_said_with_the_last_lines_of_the_services_log(tmp_path: Path) -> None:
    files = LogFiles(tmp_path)
    for n in range(12):
        files.write("web", f"line {n}")
    files.close()
    report = failure_report("web", "backoff", "exited with code 3; restarting in 0.4 s", tmp_path)
    assert report[0] == "web is crash-looping (backoff) before it was ready: exited with code 3; restarting in 0.4 s"
    assert report[1:] == ["last 10 lines of web's output:", *(f"  line {n}" for n in range(2, 12))]
    assert failure_report("db", "failed", "exited with code 1", tmp_path) == ["db failed before it was ready: exited with code 1", "db printed nothing"]
