"""`Stack`: one sandboxd stack brought up and down from Python, through the command line.

Every Stack gets a unique name (the folder's name and a random suffix), so many run side by side,
in one process and across pytest-xdist workers; sockets on port 0 avoid port clashes. Needs root,
as `sandboxd up` does. Each stack is a detached `sandboxd up -d --wait`; leaving the `with` block
brings it down and removes everything it made. Every call runs `python -m sandboxd`: this module
imports nothing of sandboxd's but its errors and the control socket's types (wire.py), and
nothing outside the standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from sandboxd.errors import SandboxdError
from sandboxd.wire import StackStatus


class Stack:
    """A spec folder brought up as a stack of its own; `with Stack(...)` brings it up, then down."""

    def __init__(self, path: str | os.PathLike[str], name: str | None = None, environment: dict[str, dict[str, str]] | None = None) -> None:
        """`environment`: per service, variables set on top of the spec's (`sandboxd up --env`).
        `name` defaults to the folder's name and a random suffix. Nothing runs until `up`."""
        self.path = Path(path).resolve()
        self.name = name or f"{self.path.name}-{uuid.uuid4().hex[:8]}"
        self.environment = environment or {}
        self.running = False

    def _cli(self, *args: str, check: bool = True) -> str:
        """The stdout of `sandboxd ARGS`; with `check`, a SandboxdError with its stderr if it fails."""
        result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, errors="replace")
        if check and result.returncode != 0:
            raise SandboxdError(f"sandboxd {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def up(self) -> Stack:
        """Bring the stack up detached and return once every eager service is ready (`up -d --wait`)."""
        env = [f"--env={svc}:{key}={value}" for svc, pairs in self.environment.items() for key, value in pairs.items()]
        self._cli("up", "-d", "--wait", "-p", self.name, *env, str(self.path))
        self.running = True
        return self

    def down(self) -> None:
        """Bring the stack down, if it is up; everything it made is removed."""
        if self.running:
            self._cli("down", "-p", self.name, check=False)
            self.running = False

    def __enter__(self) -> Stack:
        return self.up()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.down()

    def status(self) -> StackStatus:
        """What `sandboxd ps --json` says of this stack (checked by the CLI, see sandboxd/wire.py)."""
        result: StackStatus = json.loads(self._cli("ps", "--json", "-p", self.name))
        return result

    def address(self, socket_name: str) -> tuple[str, int] | str:
        """The real address of a socket unit's first listen entry: (host, port), or a unix path."""
        for service in self.status()["services"]:
            for sock in service["sockets"]:
                if sock["socket"] == socket_name:
                    family, _, rest = sock["address"].partition(":")
                    if family in ("tcp", "udp"):
                        host, _, port = rest.rpartition(":")
                        return host.strip("[]"), int(port)
                    return str(rest)
        raise SandboxdError(f"no socket {socket_name!r} in stack {self.name!r}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every service is ready, waiting for activation, or exited; SandboxdError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s["ready"] or s["state"] in ("waiting", "exited") for s in self.status()["services"]):
                return
            time.sleep(0.05)
        raise SandboxdError(f"stack {self.name!r} was not ready within {timeout:g} s")

    def logs(self, service: str) -> str:
        """What the service wrote so far, its lines without the `service | ` prefix."""
        lines = self._cli("logs", "-p", self.name, service).splitlines()
        return "\n".join(line.split("| ", 1)[1] if "| " in line else line for line in lines)

    def exec(self, service: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a command inside the service's sandbox (pipes, no terminal, nothing on its stdin);
        its exit code, stdout and stderr."""
        argv = [sys.executable, "-m", "sandboxd", "exec", "-T", "-p", self.name, service, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def restart(self, service: str) -> None:
        """Restart one service (`sandboxd restart`); returns once its new sandbox is launched."""
        self._cli("restart", "-p", self.name, service)

    def stop(self, service: str) -> None:
        """Stop one service (`sandboxd stop`); its sockets stay open."""
        self._cli("stop", "-p", self.name, service)

    def start(self, service: str) -> None:
        """Start a stopped service again (`sandboxd start`)."""
        self._cli("start", "-p", self.name, service)
