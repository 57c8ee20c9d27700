"""The CLI's side of the control socket, and finding running stacks. Standard library only (and
the protocol's types, sandboxd/wire.py), so that `sandboxd ps --json` answers quickly. Each
answer is checked against the type of its request's answer here, where it is decoded."""

from __future__ import annotations

import json
import os
import socket
from typing import cast, overload

from sandboxd.errors import HostError, SandboxdError
from sandboxd.host.paths import RUNTIME_ROOT, alive
from sandboxd.wire import (
    ApplyAnswer,
    ApplyRequest,
    Answer,
    Done,
    DownRequest,
    ExecInfoAnswer,
    ExecInfoRequest,
    KillRequest,
    QueuesAnswer,
    QueuesRequest,
    Request,
    ServicesRequest,
    StatusAnswer,
    StatusRequest,
    UsageAnswer,
    UpgradeRequest,
    UsageRequest,
    conforms,
)

ANSWERS: dict[str, type] = {"status": StatusAnswer, "apply": ApplyAnswer, "exec_info": ExecInfoAnswer, "usage": UsageAnswer, "queues": QueuesAnswer}  # others: Done


def running_stacks() -> dict[str, int]:
    """Stack name -> supervisor pid, for every stack whose supervisor is alive."""
    stacks: dict[str, int] = {}
    if not RUNTIME_ROOT.is_dir():
        return stacks
    for directory in sorted(RUNTIME_ROOT.iterdir()):
        try:
            pid = int(json.loads((directory / "state.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if alive(pid):
            stacks[directory.name] = pid
    return stacks


def choose_stack(name: str | None) -> str:
    stacks = running_stacks()
    if name:
        if name not in stacks:
            raise SandboxdError(f"no stack named {name!r} is running" + (f" (running: {', '.join(stacks)})" if stacks else ""))
        return name
    if len(stacks) == 1:
        return next(iter(stacks))
    if not stacks:
        raise SandboxdError("no stack is running (start one with: sandboxd up -d DIR)")
    raise SandboxdError(f"several stacks are running ({', '.join(stacks)}); choose one with -p NAME")


def connect(stack: str, timeout: float = 60.0) -> socket.socket:
    """A connection to the stack's control socket. `sandboxd exec` holds one for as long as its
    command runs: when it closes (however the CLI ends), the stack ends what is left of it."""
    path = RUNTIME_ROOT / stack / "control.sock"
    if os.geteuid() != 0 and not os.access(path, os.W_OK):
        raise HostError(f"the control socket of stack {stack!r} belongs to root (mode 0600); run sandboxd as root (e.g. sudo sandboxd ...)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise SandboxdError(f"stack {stack!r} does not answer on {path}; is it still starting or stopping?") from None
    return sock


@overload
def ask(sock: socket.socket, message: StatusRequest) -> StatusAnswer: ...
@overload
def ask(sock: socket.socket, message: ApplyRequest) -> ApplyAnswer: ...
@overload
def ask(sock: socket.socket, message: ExecInfoRequest) -> ExecInfoAnswer: ...
@overload
def ask(sock: socket.socket, message: UsageRequest) -> UsageAnswer: ...
@overload
def ask(sock: socket.socket, message: QueuesRequest) -> QueuesAnswer: ...
@overload
def ask(sock: socket.socket, message: ServicesRequest | KillRequest | DownRequest | UpgradeRequest) -> Done: ...
def ask(sock: socket.socket, message: Request) -> Answer:
    """One request on an open connection, and its answer (raised as SandboxdError if refused, or
    if it is not what the protocol says the request is answered with: see wire.py)."""
    sock.sendall(json.dumps(message).encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    try:
        answer: object = json.loads(data)
    except ValueError:
        raise SandboxdError(f"the stack's answer to {message['cmd']!r} is not JSON: {data[:200]!r}") from None
    if not isinstance(answer, dict):
        raise SandboxdError(f"the stack's answer to {message['cmd']!r} is not a JSON object: {answer!r}")
    if not answer.get("ok"):
        raise SandboxdError(str(answer.get("error", "the stack refused the request")))
    why = conforms(answer, ANSWERS.get(message["cmd"], Done))
    if why:
        raise SandboxdError(f"the stack's answer to {message['cmd']!r} is malformed: {why}")
    return cast(Answer, answer)


@overload
def request(stack: str, message: StatusRequest, timeout: float = ...) -> StatusAnswer: ...
@overload
def request(stack: str, message: ApplyRequest, timeout: float = ...) -> ApplyAnswer: ...
@overload
def request(stack: str, message: ExecInfoRequest, timeout: float = ...) -> ExecInfoAnswer: ...
@overload
def request(stack: str, message: UsageRequest, timeout: float = ...) -> UsageAnswer: ...
@overload
def request(stack: str, message: QueuesRequest, timeout: float = ...) -> QueuesAnswer: ...
@overload
def request(stack: str, message: ServicesRequest | KillRequest | DownRequest | UpgradeRequest, timeout: float = ...) -> Done: ...
def request(stack: str, message: Request, timeout: float = 60.0) -> Answer:
    """One request on a connection of its own (see ask)."""
    with connect(stack, timeout) as sock:
        return ask(sock, message)
