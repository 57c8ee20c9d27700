"""Failures said at once, with the reason: `up -d` (and `--wait`) gives up as soon as a service
fails or crash-loops, naming it, why and its last lines; `ps` and `ps --json` say why every failed
or backoff service is; the foreground says the same of a service that failed before it was ready.

"At once" is proved without timing: the crash service waits 600 s before a restart and has 600 s
to be ready, the CLI's own timeout is an hour, and the test's is HANG: the CLI can only return
within it by seeing the first backoff (and `ps` then shows exactly one restart scheduled)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import HANG, wait_until, write

from sandboxd.errors import SandboxdError
from sandboxd.testing import Stack

CRASH = """
kind: service
ready: notify
restart: on-failure
restart_delay: 600s
start_timeout: 600s
command: [sh, -c, 'echo starting up; echo config file missing >&2; exit 3']
"""


def sbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=HANG)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _services(stack: str) -> dict[str, dict[str, Any]]:
    return {svc["name"]: svc for svc in json.loads(sbd("ps", "--json", "-p", stack).stdout)["services"]}


def _ps_row(stack: str, name: str) -> str:
    return next(line for line in sbd("ps", "-p", stack).stdout.splitlines() if line.startswith(f"{name} "))


def test_up_wait_fails_at_once_naming_a_service_that_crashes_at_start(spec_dir: Path) -> None:
    write(spec_dir, "ok.yaml", "kind: service\ncommand: sleep 1000\n")
    write(spec_dir, "crash.yaml", CRASH)
    try:
        up = sbd("up", "-d", "--wait", "--timeout", "3600", "-p", "crashy", str(spec_dir), check=False)
        assert up.returncode == 1, up.stderr
        assert "sandboxd: crash is crash-looping (backoff) before it was ready: exited with code 3; restarting in 600 s\n" in up.stderr
        assert "sandboxd: last 2 lines of crash's output:\nsandboxd:   starting up\nsandboxd:   config file missing\n" in up.stderr
        assert "sandboxd: stack 'crashy' keeps running; see sandboxd ps -p crashy" in up.stderr
        services = _services("crashy")
        crash = services["crash"]
        assert (crash["state"], crash["restarts"]) == ("backoff", 1)  # the first backoff: no restart since
        assert crash["reason"] == "exited with code 3; restarting in 600 s"
        assert crash["exit_code"] == 3 and "signal" not in crash
        assert services["ok"]["state"] == "running" and services["ok"]["reason"] == ""  # the others keep running
        assert "backoff" in _ps_row("crashy", "crash") and _ps_row("crashy", "crash").endswith("  exited with code 3; restarting in 600 s")
    finally:
        sbd("down", "-p", "crashy", check=False)


def test_up_fails_at_once_when_a_service_cannot_start_and_ps_says_why(spec_dir: Path) -> None:
    write(spec_dir, "ok.yaml", "kind: service\ncommand: sleep 1000\n")
    write(spec_dir, "bad.yaml", "kind: service\nrestart: 'no'\nworkdir: /nonexistent/dir\ncommand: sleep 1000\n")
    try:
        up = sbd("up", "-d", "-p", "cannot", str(spec_dir), check=False)
        assert up.returncode == 1, up.stderr
        assert "sandboxd: bad failed before it was ready: could not start: " in up.stderr, up.stderr
        assert "sandboxd: bad printed nothing\n" in up.stderr
        bad = _services("cannot")["bad"]
        assert bad["state"] == "failed" and bad["reason"].startswith("could not start: ")
        assert "exit_code" not in bad and "signal" not in bad
        assert _ps_row("cannot", "bad").endswith("  " + bad["reason"])
    finally:
        sbd("down", "-p", "cannot", check=False)


def test_services_killed_by_the_pids_limit_and_by_start_timeout_say_so_in_ps(spec_dir: Path) -> None:
    spawn = "import subprocess\\nprocs = [subprocess.Popen(['sleep', '1000']) for _ in range(50)]"
    write(spec_dir, "forks.yaml", f'kind: service\nrestart: "no"\nlimits: {{pids: 8}}\ncommand: [python3, -c, "{spawn}"]\n')
    write(spec_dir, "slow.yaml", "kind: service\nrestart: 'no'\nready: notify\nstart_timeout: 300ms\ncommand: sleep 1000\n")
    try:
        up = sbd("up", "-d", "--wait", "-p", "limited", str(spec_dir), check=False)
        assert up.returncode == 1 and " failed before it was ready: " in up.stderr, up.stderr

        def all_failed() -> dict[str, dict[str, Any]] | None:
            found = _services("limited")
            return found if all(s["state"] == "failed" for s in found.values()) else None

        services = wait_until(all_failed, "both to fail")
        assert services["forks"]["reason"] == "pids limit reached; exited with code 1"
        assert services["forks"]["exit_code"] == 1
        assert services["slow"]["reason"] == "not ready within start_timeout (0.3 s); killed by SIGTERM"
        assert services["slow"]["signal"] == "SIGTERM" and "exit_code" not in services["slow"]
        assert _ps_row("limited", "forks").endswith("  pids limit reached; exited with code 1")
        assert _ps_row("limited", "slow").endswith("  not ready within start_timeout (0.3 s); killed by SIGTERM")
    finally:
        sbd("down", "-p", "limited", check=False)


def test_the_foreground_says_at_once_which_service_failed_before_it_was_ready_and_keeps_the_others(run_stack, spec_dir: Path) -> None:
    write(spec_dir, "ok.yaml", "kind: service\ncommand: sleep 1000\n")
    write(spec_dir, "crash.yaml", "kind: service\nrestart: 'no'\nready: notify\ncommand: [sh, -c, 'echo config file missing >&2; exit 3']\n")
    stack = run_stack(spec_dir, "-p", "front")
    stack.wait_for("sandboxd: crash failed before it was ready: exited with code 3\nsandboxd: last line of crash's output:\nsandboxd:   config file missing\n", "err")
    assert _services("front")["ok"]["state"] == "running"
    assert stack.stop() == 0


def test_stack_up_raises_at_once_with_the_reason_and_the_logs_and_brings_the_stack_down(spec_dir: Path) -> None:
    write(spec_dir, "ok.yaml", "kind: service\ncommand: sleep 1000\n")
    write(spec_dir, "crash.yaml", CRASH)
    with pytest.raises(SandboxdError) as failed:
        with Stack(spec_dir):
            pass
    message = str(failed.value)
    assert "crash (backoff) while waiting for every service to be ready\ncrash: exited with code 3; restarting in 600 s\n" in message, message
    assert "--- last lines of crash ---\nstarting up\nconfig file missing" in message
    # Nothing of the stack is left: the autouse fixture checks it after the test.


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detached"])
def test_a_later_services_runtime_that_cannot_be_made_ends_the_stack_with_its_error_and_leaves_nothing(spec_dir: Path, socket_dir: Path, detach: bool) -> None:
    # The runtimes are made in order before any launch (supervisor.py's _prepare): s1..s3's are
    # made (s1 eager, s2 waiting for its first connection, s3 for s1) when s4's cgroup refuses its
    # process limit (the kernel's pids.max is at most 2^22); s5 and s6 are never made.
    for i in range(1, 7):
        extra = {2: "start: on-demand\n", 3: "after: [s1]\n", 4: "limits: {pids: 5000000}\n"}.get(i, "")
        write(spec_dir, f"s{i}.yaml", f"kind: service\ncommand: sleep 1000\n{extra}---\nkind: socket\nlisten: unix:{socket_dir}/s{i}.sock\n")
    up = sbd("up", *(["-d"] if detach else []), "-p", "later", str(spec_dir), check=False)
    assert up.returncode == 1, up.stderr
    lines = up.stderr.splitlines()
    assert "sandboxd: cannot set the limits of s4: Invalid argument (" in up.stderr, up.stderr
    assert not [line for line in lines if line.startswith(("sandboxd: s1", "sandboxd: s2", "sandboxd: s3"))], up.stderr
    assert not list(socket_dir.iterdir())
    # Nothing else of the stack is left either: the autouse fixture checks it after the test.
