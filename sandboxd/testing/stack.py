"""`Stack`: one sandboxd stack brought up and down from Python, through the command line.

Every Stack gets a unique name (the folder's name and a random suffix), so many run side by side,
in one process and across pytest-xdist workers; sockets on port 0 avoid port clashes. Needs root,
as `sandboxd up` does. Each stack is a detached `sandboxd up -d --wait`; leaving the `with` block
brings it down and removes everything it made. Bringing a stack up and down, restarts and `exec`
run `python -m sandboxd`; what is polled (status, readiness) asks the stack's control socket
directly, and logs are read from the stack's log files, so waiting costs no process per poll.

`up` and every wait raise SandboxdError at once when a service has failed or is crash-looping
(in backoff) before it was ready, naming it and why (its exit code or signal, "oom-killed",
"pids limit reached", start_timeout…); every SandboxdError raised here ends with the last lines
of the services' logs (the failing one's first), as a test report should show them. A stack
whose `up` failed so is brought down before the error is raised.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from sandboxd.cli.client import request, running_stacks
from sandboxd.daemon import logs
from sandboxd.errors import SandboxdError
from sandboxd.host.paths import RUNTIME_ROOT
from sandboxd.wire import ServiceStatus, SocketQueue, StackStatus

T = TypeVar("T")
POLL = 0.02  # seconds between two looks at the stack while waiting
TAIL = 20  # log lines per service in an error
BROKEN = ("failed", "backoff")  # a service in one of these before it was ready will not be, now


class Stack:
    """A spec folder brought up as a stack of its own; `with Stack(...)` brings it up, then down."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        environment: dict[str, dict[str, str]] | None = None,
        listen: Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        """A stack of the spec folder `path`; nothing runs until `up` (or `with`).

        `name`: the stack's name (`-p`); by default the folder's name and a random suffix, so
        that the same folder runs many times at once. `environment`: per service, variables set
        on top of the spec's (`sandboxd up --env`). `listen`: per socket unit (or service with
        `listen:`), the address or addresses to bind instead of the spec's (`sandboxd up
        --listen`), like `{"web": "tcp:127.0.0.1:0"}`: port 0 gives each stack a free port,
        which `address("web")` then says."""
        self.path = Path(path).resolve()
        self.name = name or f"{self.path.name}-{uuid.uuid4().hex[:8]}"
        self.environment = environment or {}
        self.listen = {sock: [given] if isinstance(given, str) else list(given) for sock, given in (listen or {}).items()}
        self.running = False

    def _cli(self, *args: str, check: bool = True) -> str:
        """The stdout of `sandboxd ARGS`; with `check`, a SandboxdError with its stderr if it fails."""
        result = subprocess.run([sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, errors="replace")
        if check and result.returncode != 0:
            raise SandboxdError(f"sandboxd {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def up(self) -> Stack:
        """Bring the stack up detached and return once every eager service is ready (`up -d --wait`).
        If a service fails or crash-loops (backoff) first: SandboxdError at once, naming it, why,
        and with the last lines of the logs (as `wait_ready` raises it), the stack brought down."""
        env = [f"--env={svc}:{key}={value}" for svc, pairs in self.environment.items() for key, value in pairs.items()]
        env += [f"--listen={sock}={address}" for sock, addresses in self.listen.items() for address in addresses]
        try:
            self._cli("up", "-d", "--wait", "-p", self.name, *env, str(self.path))
        except SandboxdError as failed:
            if self.name not in running_stacks():
                raise
            self.running = True  # `up -d` leaves a stack with a broken service running: this one goes
            try:
                services = self.status()["services"]
                broken = [s for s in services if s["state"] in BROKEN and not s["ready"]]
                raise (self._broken(broken, services, "every service to be ready") if broken else failed) from None
            finally:
                self.down()
        self.running = True
        return self

    def down(self) -> None:
        """Bring the stack down, if it is up; everything it made is removed."""
        if self.running:
            self._cli("down", "-p", self.name, check=False)
            self.running = False

    def __enter__(self) -> Stack:
        """Bring the stack up (`up`) and return it."""
        return self.up()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        """Bring the stack down (`down`), whether the block raised or not."""
        self.down()

    def status(self) -> StackStatus:
        """What `sandboxd ps --json` says of this stack, asked of its control socket (every key
        checked against sandboxd/wire.py)."""
        answer = request(self.name, {"cmd": "status"})
        return {
            "stack": answer["stack"],
            "folder": answer["folder"],
            "pid": answer["pid"],
            "started": answer["started"],
            "userns": answer["userns"],
            "services": answer["services"],
        }

    def address(self, socket_name: str, index: int = 0) -> tuple[str, int] | str:
        """The real address of a socket unit's listen entry `index` (the first by default), as
        bound: (host, port) for tcp and udp, port 0 resolved to the port the kernel chose; a
        path (or `@name`) for a unix socket. A service's `listen:` is the socket of its name."""
        found = self.addresses().get(socket_name, [])
        if index < len(found):
            return found[index]
        raise SandboxdError(f"no socket {socket_name!r} with a listen entry {index} in stack {self.name!r}")

    def addresses(self) -> dict[str, list[tuple[str, int] | str]]:
        """Every socket unit's real addresses by socket name, in the order of its listen entries
        (as `address` gives each)."""
        found: dict[str, list[tuple[str, int] | str]] = {}
        for entry in request(self.name, {"cmd": "queues"})["sockets"]:
            found.setdefault(entry["socket"], []).append(_address(entry["address"]))
        return found

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every service is ready, waiting for its first connection, or exited (done).
        SandboxdError at once if one failed or is in backoff (crashing) before it was ready, or
        after `timeout` s; either names the services not ready and ends with their logs."""

        def ready() -> bool:
            services = self.status()["services"]
            return all(s["ready"] or s["state"] in ("waiting", "exited") for s in services)

        self._wait(ready, "every service to be ready", timeout)

    def wait_for_log(self, service: str, pattern: str, timeout: float = 30.0) -> str:
        """Wait until a line of `service`'s output matches the regular expression `pattern`
        (re.search) and return that line; SandboxdError (with the logs) if the service fails or
        the time is up first."""
        regex = re.compile(pattern)

        def matching() -> str | None:
            return next((line for line in self.logs(service).splitlines() if regex.search(line)), None)

        return self._wait(matching, f"a line of {service} matching {pattern!r}", timeout, service)

    def wait_for_http(self, socket_name: str, path: str = "/", status: int = 200, timeout: float = 30.0) -> bytes:
        """Wait until a GET of `path` on the socket unit's address (TCP) answers `status`, and return
        the body. Connections that fail, are cut or answer another status are tried again."""
        address = self.address(socket_name)
        if not isinstance(address, tuple):
            raise SandboxdError(f"socket {socket_name!r} of stack {self.name!r} is not TCP ({address})")
        host, port = address
        seen: list[str] = []

        def answered() -> bytes | None:
            connection = http.client.HTTPConnection(host, port, timeout=max(1.0, timeout / 10))
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as e:
                seen[:] = [f"{type(e).__name__}: {e}"]
                return None
            finally:
                connection.close()
            seen[:] = [f"HTTP {response.status}"]
            return body if response.status == status else None

        what = f"GET {path} on {socket_name} ({host}:{port}) to answer {status}"
        return self._wait(answered, what, timeout, last=lambda: seen[0] if seen else "")

    def wait_for_accept(self, socket_name: str, index: int = 0, timeout: float = 30.0) -> None:
        """Wait until the service behind a stream socket accepts connections: with sockets bound
        first, a connect() succeeds long before (the kernel queues it), so this makes one probe
        connection to the socket's address and returns once the socket's accept queue, which
        sandboxd reads from the kernel, is empty: the service has taken every connection that
        waited, the probe's included (clients connecting meanwhile may delay that). The probe is
        then closed, having sent nothing. It starts an on-demand service; for an `accept: true`
        socket sandboxd itself accepts, and for a forwarding proxy the proxy does, once the
        program listens (and is ready). SandboxdError if the service fails first, on timeout, for
        a datagram socket, or for one bound inside a service's namespace (not reachable here)."""
        entry = self._queue(socket_name, index)
        if "queued" not in entry:
            raise SandboxdError(f"socket {socket_name!r} of stack {self.name!r} ({entry['address']}) has no accept queue sandboxd can read (a datagram socket, or one it cannot see)")
        address = _address(entry["address"])
        netns = next((s["netns"] for svc in self.status()["services"] for s in svc["sockets"] if s["socket"] == socket_name), "host")
        if netns != "host":
            raise SandboxdError(f"socket {socket_name!r} of stack {self.name!r} is bound inside a service's network namespace (netns: {netns}); a probe from here cannot reach it")
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        target: str | tuple[str, int] = "\0" + address[1:] if isinstance(address, str) and address.startswith("@") else address
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            probe.connect(target)
            self._wait(lambda: self._queue(socket_name, index).get("queued") == 0, f"{entry['service']} to accept on {socket_name} ({entry['address']})", timeout, entry["service"])

    def _queue(self, socket_name: str, index: int) -> SocketQueue:
        """The accept queue of listen entry `index` of a socket unit, asked of the control socket."""
        answer = request(self.name, {"cmd": "queues", "sockets": [socket_name]})
        for entry in answer["sockets"]:
            if entry["index"] == index:
                return entry
        raise SandboxdError(f"no socket {socket_name!r} with a listen entry {index} in stack {self.name!r}")

    def _wait(self, check: Callable[[], T | None | bool], what: str, timeout: float, service: str = "", last: Callable[[], str] = lambda: "") -> T:
        """Poll `check` until it returns something true (returned); SandboxdError at once when a
        service is broken (BROKEN states), or after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result  # type: ignore[return-value]
            services = self.status()["services"]
            broken = [s for s in services if s["state"] in BROKEN and not s["ready"] and (not service or s["name"] == service)]
            if broken:
                raise self._broken(broken, services, what)
            if time.monotonic() >= deadline:
                seen = f" (last: {last()})" if last() else ""
                names = ", ".join(f"{s['name']} ({s['state']})" for s in services if not s["ready"] and s["state"] not in ("waiting", "exited"))
                raise SandboxdError(
                    f"stack {self.name!r}: timed out after {timeout:g} s waiting for {what}{seen}"
                    + (f"; not ready: {names}" if names else "")
                    + self._tails([service] if service else [], services)
                )
            time.sleep(POLL)

    def _broken(self, broken: list[ServiceStatus], services: list[ServiceStatus], what: str) -> SandboxdError:
        """The error for services found failed or in backoff: their names and states, why each is
        (its reason: "exited with code 3; restarting in 0.4 s"), then the logs' last lines."""
        names = ", ".join(f"{s['name']} ({s['state']}{': ' + s['status_text'] if s['status_text'] else ''})" for s in broken)
        reasons = "".join(f"\n{s['name']}: {s['reason']}" for s in broken if s["reason"])
        return SandboxdError(f"stack {self.name!r}: {names} while waiting for {what}{reasons}" + self._tails([s["name"] for s in broken], services))

    def _tails(self, first: list[str], services: list[ServiceStatus]) -> str:
        """The last TAIL lines of each service's log, the ones in `first` before the others."""
        names = first + [s["name"] for s in services if s["name"] not in first]
        parts = []
        for name in names:
            lines = self.logs(name).splitlines()[-TAIL:]
            parts.append(f"\n--- last lines of {name} ---\n" + ("\n".join(lines) if lines else "(nothing)"))
        return "".join(parts)

    def logs(self, service: str) -> str:
        """What the service wrote so far (stdout and stderr, in order), read from the stack's log
        files: its lines as it printed them."""
        return "\n".join(text for _stamp, text in logs.read(RUNTIME_ROOT / self.name / "logs", service))

    def exec(self, service: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a command inside the service's sandbox (pipes, no terminal, nothing on its stdin),
        as `sandboxd exec -T` does; a subprocess.CompletedProcess: `returncode` (the command's exit
        code), `stdout` and `stderr` (text)."""
        argv = [sys.executable, "-m", "sandboxd", "exec", "-T", "-p", self.name, service, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def failure_report(self) -> str:
        """The services' states and the last lines of their logs, the failed or crash-looping
        ones first: what the pytest plugin adds to the report of a test that failed."""
        try:
            services = self.status()["services"]
        except SandboxdError as e:
            return f"stack {self.name!r}: no status ({e})"
        broken = [s["name"] for s in services if s["state"] in BROKEN]
        states = "\n".join(f"{s['name']}: {s['state']}{': ' + s['reason'] if s['reason'] else ''}" for s in services)
        return f"stack {self.name!r} ({self.path})\n{states}" + self._tails(broken, services)

    def restart(self, service: str) -> None:
        """Restart one service (`sandboxd restart`); returns once its new sandbox is launched."""
        self._cli("restart", "-p", self.name, service)

    def stop(self, service: str) -> None:
        """Stop one service (`sandboxd stop`); its sockets stay open."""
        self._cli("stop", "-p", self.name, service)

    def start(self, service: str) -> None:
        """Start a stopped service again (`sandboxd start`)."""
        self._cli("start", "-p", self.name, service)


def _address(text: str) -> tuple[str, int] | str:
    """`tcp:HOST:PORT` or `udp:HOST:PORT` as (host, port), brackets of IPv6 removed; a unix
    socket's path (or `@name`)."""
    family, _, rest = text.partition(":")
    if family in ("tcp", "udp"):
        host, _, port = rest.rpartition(":")
        return host.strip("[]"), int(port)
    return rest
