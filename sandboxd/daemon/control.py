"""The control socket of a running stack: one JSON request per line, one JSON answer per line.
The verbs, their answers and every key's type are in sandboxd/wire.py (drawn there):

    status                                             ->  the stack's and each service's state
    queues                                             ->  each listening socket's accept queue
    stop, start, restart, kill, reload, down           ->  {"ok": true} once done
    apply (a reload of the stack's folder)             ->  what was added, removed, changed
    exec_info (with session: a cgroup of the command's own, emptied and removed when this
               connection closes)                      ->  pid, cgroups, confinement
    upgrade (token)                                    ->  {"ok": true} once the exec follows (upgrade.py)
    anything refused                                   ->  {"ok": false, "error": TEXT}

The socket is `/run/sandboxd/<stack>/control.sock`, mode 0600: only root may steer a stack
(a non-root user gets a clear refusal from the CLI before it even connects).

Each connection is served on its own, so a client that hangs holds only itself, within bounds:
its first request must come within IDLE_FIRST seconds, a request once begun must end (its
newline) within WHOLE_REQUEST seconds and within MAX_REQUEST bytes, and an answer must be read
within READ_ANSWER seconds; otherwise the connection is closed. After its first request a
connection may stay idle for as long as it likes: `sandboxd exec` holds one while its command runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Protocol

from sandboxd.errors import SandboxdError
from sandboxd.wire import Answer, ApplyResult, ExecInfo, ServiceUsage, SocketQueue, StackStatus


class Verbs(Protocol):
    """What the control socket asks of a running stack (operations.py does it)."""

    @property
    def instance(self) -> str: ...

    def knows(self, name: str) -> bool: ...

    def status(self, names: list[str]) -> StackStatus: ...

    def usage(self, names: list[str]) -> list[ServiceUsage]: ...

    def knows_socket(self, name: str) -> bool: ...

    def queues(self, sockets: list[str]) -> list[SocketQueue]: ...

    async def stop_service(self, name: str) -> None: ...

    def start_service(self, name: str) -> None: ...

    async def restart_service(self, name: str) -> None: ...

    def kill_service(self, name: str, signame: str) -> None: ...

    def request_down(self) -> None: ...

    async def apply_folder(self, folder: str, env: list[str], variables: dict[str, str] | None = None, listen: list[str] | None = None) -> ApplyResult: ...

    def exec_info(self, name: str, user: str = "", session: bool = False) -> ExecInfo: ...

    async def end_exec(self, path: str) -> None: ...

    async def reload_service(self, name: str) -> str: ...

    async def upgrade(self, token: str, record_format: int | None) -> str: ...


IDLE_FIRST = 30.0  # seconds a new connection has to send its first request
WHOLE_REQUEST = 30.0  # seconds a request that began has to end
READ_ANSWER = 30.0  # seconds a client has to read an answer
MAX_REQUEST = 1 << 20  # bytes of one request


class ControlServer:
    def __init__(self, verbs: Verbs, path: Path) -> None:
        self.verbs = verbs
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.StreamWriter] = set()
        self.short_of_descriptors = False  # its accept failed (EMFILE): asyncio tries again in a second

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind and listen; or serve `sock`, the listening socket an upgrade carried over."""
        if sock is not None:
            self.server = await asyncio.start_unix_server(self._serve, sock=sock)
            return
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    def listening_fd(self) -> int:
        assert isinstance(self.server, asyncio.Server)
        return int(self.server.sockets[0].fileno())

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.clients):
                writer.close()  # a client that hangs does not hold the stack's end
            await self.server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        execs: list[str] = []  # cgroups of `sandboxd exec` commands whose CLI holds this connection
        self.clients.add(writer)
        self.short_of_descriptors = False
        try:
            first = True
            while line := await _next_request(reader, IDLE_FIRST if first else None):
                first = False
                try:
                    answer: Answer = await self.handle(_request(json.loads(line)), execs)
                except (ValueError, KeyError, TypeError, OSError, SandboxdError) as e:
                    answer = {"ok": False, "error": f"bad request: {e}" if isinstance(e, (KeyError, TypeError)) else str(e)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), READ_ANSWER)
        except (ConnectionError, TimeoutError, ValueError):
            pass  # gone, hung, or a request over MAX_REQUEST: the connection is closed
        finally:
            self.clients.discard(writer)
            writer.close()
            # The connection closes when the CLI ends, however it ends (the kernel closes it).
            for path in execs:
                await self.verbs.end_exec(path)

    async def handle(self, request: dict[str, object], execs: list[str] | None = None) -> Answer:
        """The answer to one request (wire.py types both); the request is decoded JSON, checked
        here key by key, as it may come from anything that can open the socket."""
        sup = self.verbs
        cmd = request["cmd"]
        names = _names(request.get("services"))
        unknown = [n for n in names if not sup.knows(n)]
        if unknown:
            return {"ok": False, "error": f"no service {', '.join(repr(n) for n in unknown)} in stack {sup.instance!r}"}
        match cmd:
            case "status":
                return {"ok": True, **sup.status(names)}
            case "usage":
                return {"ok": True, "services": sup.usage(names)}
            case "queues":
                sockets = _names(request.get("sockets"))
                if unknown := [n for n in sockets if not sup.knows_socket(n)]:
                    return {"ok": False, "error": f"no socket {', '.join(repr(n) for n in unknown)} in stack {sup.instance!r}"}
                return {"ok": True, "sockets": sup.queues(sockets)}
            case "stop":
                await asyncio.gather(*(sup.stop_service(n) for n in names))
            case "start":
                for name in names:
                    sup.start_service(name)
            case "restart":
                await asyncio.gather(*(sup.restart_service(n) for n in names))
            case "kill":
                for name in names:
                    sup.kill_service(name, str(request.get("signal", "SIGTERM")))
            case "down":
                sup.request_down()
            case "apply":
                variables = _variables(request.get("variables"))
                listen = _names(request.get("listen"))
                return {"ok": True, **await sup.apply_folder(str(request["folder"]), _names(request.get("env")), variables, listen)}
            case "exec_info":
                info = sup.exec_info(names[0], str(request.get("user", "")), session=bool(request.get("session")) and execs is not None)
                if "exec_cgroup" in info and execs is not None:
                    execs.append(info["exec_cgroup"])
                return {"ok": True, **info}
            case "upgrade":
                fmt = request.get("format")
                error = await sup.upgrade(str(request["token"]), fmt if type(fmt) is int else None)
                if error:
                    return {"ok": False, "error": error}
            case "reload":
                errors = await asyncio.gather(*(sup.reload_service(n) for n in names))
                if any(errors):
                    return {"ok": False, "error": "; ".join(e for e in errors if e)}
            case _:
                return {"ok": False, "error": f"unknown command {cmd!r}"}
        return {"ok": True}


async def _next_request(reader: asyncio.StreamReader, idle: float | None) -> bytes:
    """The next request's line (b"" at the end): its first byte within `idle` seconds (None:
    whenever it comes), the rest within WHOLE_REQUEST. TimeoutError if not."""
    start = await asyncio.wait_for(reader.read(1), idle)
    if not start or start == b"\n":
        return start
    return start + await asyncio.wait_for(reader.readline(), WHOLE_REQUEST)


def _request(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise TypeError("a request is a JSON object")
    return value


def _variables(value: object) -> dict[str, str] | None:
    """The variables ${VAR} takes in a reload's spec (the caller's), None if absent."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"expected a mapping of strings, got {type(value).__name__}")
    return value


def _names(value: object) -> list[str]:
    """A list of strings from the request (services, env), empty if absent."""
    if not value:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"expected a list of strings, got {value!r}")
    return value
