"""The fork server goes on serving requests while its launches are under way (forkserver.py:
a launch waits for its spawner's reply in the selector, not in a blocking read): many launches
sent at once each end in their own service, and a sandbox that exits at once, maybe before its
spawner's reply was read, is reported once, to its own service, with its own exit code.

No wait here is timed: each ends on its event (a state in `ps`); the bound of every wait (HANG)
only ends a hang."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import HANG, wait_until, write


def sbd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, timeout=HANG * 2)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def services(stack: str) -> dict[str, dict[str, Any]]:
    return {svc["name"]: svc for svc in json.loads(sbd("ps", "--json", "-p", stack).stdout)["services"]}


@contextlib.contextmanager
def detached(spec_dir: Path, stack: str, up_fails: bool = False) -> Iterator[None]:
    """`up -d` of the folder (which fails when a service failed before it was ready, if
    `up_fails`); `down` afterwards, whatever happened."""
    try:
        up = sbd("up", "-d", "-p", stack, str(spec_dir), check=not up_fails)
        assert up.returncode == (1 if up_fails else 0), up.stdout + up.stderr
        yield
    finally:
        assert sbd("down", "-p", stack, check=False).returncode == 0


def settled(stack: str, wanted: dict[str, str]) -> dict[str, dict[str, Any]]:
    """`ps` once every service named is in its wanted state."""

    def now() -> dict[str, dict[str, Any]] | None:
        seen = services(stack)
        return seen if all(seen[name]["state"] == state for name, state in wanted.items()) else None

    return wait_until(now, f"the states {wanted}")


QUITTERS = 12
STAYERS = 12


def test_many_launches_at_once_each_end_reaches_its_own_service(spec_dir: Path) -> None:
    """Two dozen launches sent together: those that exit at once, each with an exit code of its
    own, and with and without a user namespace; every exit goes to its own service, once."""
    for k in range(QUITTERS):
        userns = "true" if k % 2 else "false"
        write(spec_dir, f"quits{k}.yaml", f"kind: service\nrestart: 'no'\nuserns: {userns}\ncommand: [sh, -c, 'exit {k}']\n")
    for k in range(STAYERS):
        userns = "true" if k % 2 else "false"
        write(spec_dir, f"stays{k}.yaml", f"kind: service\nuserns: {userns}\ncommand: [sleep, '3600']\n")
    wanted = {f"quits{k}": "failed" if k else "exited" for k in range(QUITTERS)} | {f"stays{k}": "running" for k in range(STAYERS)}
    with detached(spec_dir, "pipelined", up_fails=True):
        now = settled("pipelined", wanted)
        for k in range(1, QUITTERS):
            assert now[f"quits{k}"]["exit_code"] == k, now[f"quits{k}"]
            assert now[f"quits{k}"]["restarts"] == 0
        pids = [now[f"stays{k}"]["pid"] for k in range(STAYERS)]
        assert len(set(pids)) == STAYERS and all(pid > 0 for pid in pids)
        log = sbd("logs", "-p", "pipelined", "sandboxd").stdout
        for k in range(1, QUITTERS):
            said = [line for line in log.splitlines() if f"quits{k}: " in line and f"exited with code {k}" in line]
            assert len(said) == 1, log

